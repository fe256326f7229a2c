"""Who this node is: its own Ed25519 key in ``<data_dir>/node.key``, made on first start.

The key never leaves the node and is never overwritten; the hub knows only its public
half. The node id follows from the public key (issc.nodeauth.node_id_for), so a node
keeps its id for as long as it keeps its data_dir, and a node with a fresh data_dir is
a new node.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from issc.keys import load_or_create_private_key, load_private_key, public_key_string
from issc.nodeauth import Answer, Claim, answer_challenge, node_id_for

log = logging.getLogger(__name__)

KEY_FILE = "node.key"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    key: Ed25519PrivateKey
    public_key: str  # "ed25519:<base64>"
    node_id: str
    path: Path

    @classmethod
    def load_or_create(cls, data_dir: Path) -> NodeIdentity:
        """The node's identity, its key made first if ``data_dir`` has none.

        Raises:
            KeyFormatError: node.key exists but is not a usable key (it is left alone).
        """
        path = data_dir / KEY_FILE
        key, created = load_or_create_private_key(path)
        identity = cls._of(key, path)
        if created:
            log.info("made a new node key %s: this is node %s", path, identity.node_id)
        elif path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "%s can be read by other users (mode %o); anyone who reads it can pose as "
                "this node: chmod 600 it",
                path,
                stat.S_IMODE(path.stat().st_mode),
            )
        return identity

    @classmethod
    def _of(cls, key: Ed25519PrivateKey, path: Path) -> NodeIdentity:
        public = public_key_string(key.public_key())
        return cls(key=key, public_key=public, node_id=node_id_for(public), path=path)

    def answer(self, nonce: bytes, hub_kex: bytes, volunteer: str, token: str | None) -> Answer:
        """The answer to the hub's challenge: this key's signature over the transcript of
        the challenge, a fresh key exchange value and the hello's claim; and the
        connection's result key.

        Raises:
            ValueError: the challenge's values have the wrong length, or the hub's key
                exchange value is of small order.
        """
        claim = Claim(volunteer=volunteer, public_key=self.public_key, token=token)
        return answer_challenge(self.key, nonce, hub_kex, claim)


def node_id_in(data_dir: Path) -> str | None:
    """The id of the node whose data_dir this is, or None if it has no key yet (for tools
    and tests; reads the key, never makes one).

    Raises:
        KeyFormatError: node.key exists but is not a usable key.
    """
    path = data_dir / KEY_FILE
    if not path.exists():
        return None
    return node_id_for(public_key_string(load_private_key(path).public_key()))
