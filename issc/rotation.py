"""Owner key rotation: a new key is trusted only when the old one endorsed it.

An *endorsement* is an Ed25519 signature by the old key over::

    ENDORSEMENT_DOMAIN + project name (UTF-8) + b"\\0" + old key (32 raw bytes) + new key (32)

The project name cannot hold a NUL (``NAME_PATTERN``), and the keys have a fixed length,
so the message is unambiguous; the domain prefix keeps it from ever being mistaken for a
bundle signature (``issc-bundle-v1``) or a node's proof (``issc.nodeauth``), and the name
keeps an endorsement made for one project from being replayed for another.

``issc-project rotate`` writes endorsements to a *chain file* (JSON, ``CHAIN_FORMAT``)::

    {"format": 1, "endorsements": [{"project": ..., "old_key": ..., "new_key": ...,
                                    "signature": "<base64>"}, ...]}

oldest first, and ``issc-project pack --endorsements FILE`` copies the chain into the
signed manifest, where each link's new key is the next link's old key and the last link's
new key is the bundle's ``owner_key``. A node (or hub) that pins any key of the chain can
so walk forward to the key that signed the bundle.

Rules (``check_rotation``):

* every link verifies with its own old key, names the bundle's project, and links up
  with the next (no gap); the last new key is the signer; no key appears twice (a chain
  never leads back to a key it left);
* the pinned key is the signer, or the old key of one of the links;
* a key the holder of the pin has seen superseded is never trusted again: once a node
  or hub moved from K to K', a bundle signed by K is refused (a rollback), even with an
  endorsement. See docs/security.md for what a stolen old key can and cannot do.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from issc.errors import BundleError, KeyFormatError
from issc.fsutil import fsync_dir
from issc.keys import parse_public_key, public_key_bytes, public_key_string
from issc.manifest import (
    MAX_ENDORSEMENTS,
    NAME_PATTERN,
    Endorsement,
    Manifest,
    check_endorsements,
    checker_for,
    endorsement_to_json,
)

ENDORSEMENT_DOMAIN = b"issc-key-rotation-v1\0"
CHAIN_FORMAT = 1
MAX_CHAIN_FILE_BYTES = 1024 * 1024


def short_key(key: str) -> str:
    """A key string short enough for a message, still telling keys apart."""
    return key if len(key) <= 24 else key[:20] + "..."


def endorsement_message(project: str, old_key: str, new_key: str) -> bytes:
    """The bytes an endorsement signs (see the module docstring)."""
    old = public_key_bytes(parse_public_key(old_key))
    new = public_key_bytes(parse_public_key(new_key))
    return ENDORSEMENT_DOMAIN + project.encode("utf-8") + b"\0" + old + new


def endorse(project: str, old: Ed25519PrivateKey, new_key: Ed25519PublicKey) -> Endorsement:
    """The old key's endorsement of ``new_key`` for ``project``.

    Raises:
        BundleError: the new key is the old key, or ``project`` is not a project name.
    """
    if not NAME_PATTERN.fullmatch(project):
        raise BundleError(f"{project!r} is not a project name")
    old_key = public_key_string(old.public_key())
    new = public_key_string(new_key)
    if new == old_key:
        raise BundleError("the new key is the old key; nothing to rotate")
    signature = old.sign(endorsement_message(project, old_key, new))
    return Endorsement(project=project, old_key=old_key, new_key=new, signature=signature)


def check_chain(project: str, chain: Sequence[Endorsement], signer: str) -> None:
    """Check a chain on its own: signatures, project, continuity, end, no repeated key.

    Raises:
        BundleError: naming the link (``endorsement N``) and the cause.
    """
    if not chain:
        return
    seen = {chain[0].old_key}
    for index, link in enumerate(chain):
        where = f"endorsement {index + 1} of {len(chain)} ({_arrow(link)})"
        if link.project != project:
            raise BundleError(
                f"{where}: made for project {link.project!r}, not {project!r}; an endorsement "
                "counts only for the project it names"
            )
        if index > 0 and link.old_key != chain[index - 1].new_key:
            raise BundleError(
                f"{where}: gap in the chain: it starts from {short_key(link.old_key)}, but the "
                f"link before it ends at {short_key(chain[index - 1].new_key)}"
            )
        try:
            parse_public_key(link.old_key).verify(
                link.signature, endorsement_message(project, link.old_key, link.new_key)
            )
        except (InvalidSignature, KeyFormatError):
            raise BundleError(
                f"{where}: the signature does not verify with the old key "
                f"{short_key(link.old_key)} (tampered, or signed by another key)"
            ) from None
        if link.new_key in seen:
            raise BundleError(
                f"{where}: leads back to key {short_key(link.new_key)}, which the chain "
                "already left; a rotation never returns to an old key"
            )
        seen.add(link.new_key)
    if chain[-1].new_key != signer:
        raise BundleError(
            f"the endorsement chain ends at {short_key(chain[-1].new_key)}, but the bundle is "
            f"signed by {short_key(signer)}"
        )


def check_rotation(manifest: Manifest, pinned: str, superseded: Collection[str] = ()) -> None:
    """Check that one who pins ``pinned`` may trust ``manifest``'s signer: it is the pinned
    key, or a valid endorsement chain leads from the pinned key to it. (The bundle's own
    signature is the caller's to check.)

    Raises:
        BundleError: the signer is a superseded key (a rollback), the chain is bad (see
            check_chain), or it does not lead from ``pinned`` to the signer.
    """
    signer = manifest.owner_key
    if signer in superseded:
        raise BundleError(
            f"signed by owner key {short_key(signer)}, which a rotation has replaced by "
            f"{short_key(pinned)}; a rollback to an old key is refused"
        )
    check_chain(manifest.name, manifest.endorsements, signer)
    if signer == pinned:
        return
    if not manifest.endorsements:
        raise BundleError(
            f"signed by owner key {short_key(signer)}, not the trusted key {short_key(pinned)}, "
            "and it carries no endorsement from the trusted key"
        )
    if not any(link.old_key == pinned for link in manifest.endorsements):
        raise BundleError(
            f"signed by owner key {short_key(signer)}, not the trusted key {short_key(pinned)}, "
            f"and its endorsement chain (from {short_key(manifest.endorsements[0].old_key)}) "
            "does not pass through the trusted key"
        )


def trusted_owner_key(
    manifest: Manifest, pinned: str, superseded: Collection[str] = ()
) -> Ed25519PublicKey:
    """The key to check ``manifest``'s signature with, for one who pins ``pinned``: the
    signer once check_rotation accepted it.

    A bundle that claims no rotation is checked against the pinned key itself, so that a
    foreign signature fails the signature check with its usual message.

    Raises:
        BundleError: as check_rotation.
    """
    if not manifest.endorsements and manifest.owner_key not in superseded:
        return parse_public_key(pinned)
    check_rotation(manifest, pinned, superseded)
    return parse_public_key(manifest.owner_key)


def walked_keys(manifest: Manifest, pinned: str) -> list[str]:
    """The keys left behind in walking from ``pinned`` to the signer (``pinned`` first);
    empty when the pinned key signed. Call after trusted_owner_key accepted."""
    keys: list[str] = []
    walking = False
    for link in manifest.endorsements:
        walking = walking or link.old_key == pinned
        if walking:
            keys.append(link.old_key)
    return keys


def _arrow(link: Endorsement) -> str:
    return f"{short_key(link.old_key)} -> {short_key(link.new_key)}"


# --- chain files ---------------------------------------------------------------------------


def read_chain(path: Path) -> tuple[Endorsement, ...]:
    """Read a chain file (the form only; check_chain checks the signatures).

    Raises:
        BundleError: unreadable, too large, not JSON, or not a chain file (names the file).
    """
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CHAIN_FILE_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_CHAIN_FILE_BYTES:
        raise BundleError(f"{path}: larger than {MAX_CHAIN_FILE_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path}: not a JSON endorsement chain file: {exc}") from None
    checker = checker_for(str(path))
    raw = checker.mapping(document, "", ("format", "endorsements"), ("format", "endorsements"))
    if isinstance(raw["format"], bool) or raw["format"] != CHAIN_FORMAT:
        raise checker.fail("format", f"unsupported chain file format {raw['format']!r}")
    return check_endorsements(raw["endorsements"], checker)


def write_chain(path: Path, chain: Sequence[Endorsement]) -> None:
    """Write a chain file atomically (temp file, fsync, rename, fsync the directory).

    Raises:
        BundleError: the file cannot be written.
    """
    if len(chain) > MAX_ENDORSEMENTS:
        raise BundleError(f"a chain holds at most {MAX_ENDORSEMENTS} rotations")
    text = json.dumps(
        {"format": CHAIN_FORMAT, "endorsements": [endorsement_to_json(e) for e in chain]},
        indent=2,
    )
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise BundleError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)  # public: it only holds public keys and signatures
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        fsync_dir(directory)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise BundleError(f"{path}: cannot write: {exc}") from None


def extend_chain(
    path: Path, project: str, old: Ed25519PrivateKey, new_key: Ed25519PublicKey
) -> tuple[Endorsement, ...]:
    """Add the old key's endorsement of ``new_key`` to the chain file at ``path`` (made if
    missing); return the chain. The file's chain must end at the old key.

    Raises:
        BundleError: the existing chain is bad, for another project, or ends elsewhere.
    """
    chain: tuple[Endorsement, ...] = read_chain(path) if path.exists() else ()
    old_key = public_key_string(old.public_key())
    if chain:
        check_chain(project, chain, chain[-1].new_key)
        if chain[-1].new_key != old_key:
            raise BundleError(
                f"{path}: the chain ends at {short_key(chain[-1].new_key)}, not at the old key "
                f"{short_key(old_key)}; rotate from the key that signs the project now"
            )
    link = endorse(project, old, new_key)
    extended = (*chain, link)
    check_chain(project, extended, link.new_key)
    write_chain(path, extended)
    return extended
