"""Owner key rotation: a new key is trusted only along an endorsement chain from the old one.

Covers the endorsement itself (issc.rotation), `issc-project rotate` and `pack
--endorsements`, the node's cache (accepts a chain from its pinned key, remembers the
new key across restarts, refuses a rollback) and the hub's inbox (moves its pin the same
way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.blobs import ContentStore
from hub.inbox import Inbox
from hub.store import Store
from issc.bundle import (
    FILES_PREFIX,
    MANIFEST_MEMBER,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    SIGNATURE_MEMBER,
    sign_manifest,
    verify_bundle,
    verify_self_signed,
)
from issc.bundle_pack import collect_sources, write_archive, write_atomically
from issc.errors import BundleError
from issc.keys import generate_key, load_private_key, parse_public_key, public_key_string
from issc.manifest import Endorsement, manifest_from_bytes, manifest_to_bytes, parse_project_yaml
from issc.project_cli import main as project_main
from issc.rotation import endorse, read_chain
from node.cache import OWNER_KEYS_FILE, BundleCache

PROJECT_YAML = "name: primes\nversion: {version}\nentrypoint: [python3, main.py]\n"


@pytest.fixture
def keys(tmp_path: Path) -> list[Ed25519PrivateKey]:
    """Four owner keys: K0 (the first, pinned), K1, K2, and a stranger's X."""
    out = []
    for name in ("k0", "k1", "k2", "x"):
        generate_key(tmp_path / f"{name}.pem")
        out.append(load_private_key(tmp_path / f"{name}.pem"))
    return out


def pub(key: Ed25519PrivateKey) -> str:
    return public_key_string(key.public_key())


def project_dir(tmp_path: Path, version: int, name: str = "primes") -> Path:
    src = tmp_path / f"src-{name}-{version}"
    src.mkdir(exist_ok=True)
    (src / "project.yaml").write_text(PROJECT_YAML.format(version=version).replace("primes", name))
    (src / "main.py").write_text(f"print({version})\n")
    return src


def pack(
    tmp_path: Path,
    version: int,
    key: Ed25519PrivateKey,
    chain: tuple[Endorsement, ...] = (),
    name: str = "primes",
) -> Path:
    """A bundle signed by ``key`` carrying ``chain`` as is (even a bad one: no pack checks)."""
    src = project_dir(tmp_path, version, name)
    out = tmp_path / f"{name}-v{version}-{pub(key)[8:14].replace('/', '_')}-{len(chain)}.issc"
    spec = parse_project_yaml(src / "project.yaml")
    sources = collect_sources(src, skip=out, max_files=MAX_FILES, max_total_bytes=MAX_TOTAL_BYTES)
    manifest = spec.to_manifest(tuple(s.entry for s in sources), pub(key), chain)
    data = manifest_to_bytes(manifest)
    head = ((MANIFEST_MEMBER, data), (SIGNATURE_MEMBER, sign_manifest(data, key)))
    write_atomically(out, lambda fh: write_archive(fh, head, FILES_PREFIX, sources))
    return out


def chain_to(
    keys: list[Ed25519PrivateKey], upto: int, project: str = "primes"
) -> tuple[Endorsement, ...]:
    """K0 -> K1 -> ... -> K<upto>."""
    return tuple(endorse(project, keys[i], keys[i + 1].public_key()) for i in range(upto))


# --- the endorsement and the chain on their own --------------------------------------------


def test_a_bundle_signed_by_a_rotated_key_verifies_against_any_earlier_key(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    k0, k1, k2, _x = keys
    bundle = pack(tmp_path, 3, k2, chain_to(keys, 2))
    for pinned in (k0, k1, k2):
        assert verify_bundle(bundle, pinned.public_key()).owner_key == pub(k2)
    assert verify_self_signed(bundle).version == 3


def test_without_a_chain_another_key_is_refused_as_before(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    k0, k1, *_ = keys
    with pytest.raises(BundleError, match="signature does not verify with the trusted key"):
        verify_bundle(pack(tmp_path, 2, k1), k0.public_key())


def tampered(chain: tuple[Endorsement, ...]) -> tuple[Endorsement, ...]:
    first = chain[0]
    flipped = bytes([first.signature[0] ^ 1]) + first.signature[1:]
    return (dataclasses.replace(first, signature=flipped), *chain[1:])


BAD_CHAINS = {
    # name: (build(keys) -> (signer index, chain), the cause the message must name)
    "tampered": (
        lambda k: (1, tampered(chain_to(k, 1))),
        "signature does not verify with the old key",
    ),
    "another project": (
        lambda k: (1, chain_to(k, 1, project="other")),
        "made for project 'other', not 'primes'",
    ),
    "signed by a key not in the chain": (
        # Says K0 -> K1, but the stranger X signed it.
        lambda k: (
            1,
            (
                Endorsement(
                    "primes",
                    pub(k[0]),
                    pub(k[1]),
                    k[3].sign(b"issc-key-rotation-v1\0primes\0" + raw(k[0]) + raw(k[1])),
                ),
            ),
        ),
        "does not verify with the old key",
    ),
    "started by a key not pinned": (
        # A valid chain X -> K1: the stranger endorses K1; nothing leads from K0.
        lambda k: (1, (endorse("primes", k[3], k[1].public_key()),)),
        "does not pass through the trusted key",
    ),
    "gap": (
        # K0 -> K1, then K2 -> X: nothing links K1 to K2.
        lambda k: (3, (chain_to(k, 1)[0], endorse("primes", k[2], k[3].public_key()))),
        "gap in the chain",
    ),
    "ends elsewhere": (lambda k: (2, chain_to(k, 1)), "chain ends at"),
}


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


@pytest.mark.parametrize("case", sorted(BAD_CHAINS))
def test_bad_chains_are_refused_naming_the_cause(
    tmp_path: Path, keys: list[Ed25519PrivateKey], case: str
) -> None:
    build, cause = BAD_CHAINS[case]
    signer, chain = build(keys)
    bundle = pack(tmp_path, 2, keys[signer], chain)
    with pytest.raises(BundleError, match=cause):
        verify_bundle(bundle, keys[0].public_key())
    # The node refuses it too, and keeps the reason (the client reports it to the hub as
    # bundle_refused); nothing is extracted and the pinned key stays.
    cache = BundleCache(tmp_path / "cache", {"primes": pub(keys[0])})
    digest = put_part(cache, bundle)
    with pytest.raises(BundleError, match=cause):
        cache.install(digest, "primes")
    assert cause.split(" (")[0] in cache.refused[digest]
    assert cache.ready(digest) is None
    assert cache.owner_key("primes") == (pub(keys[0]), frozenset())


def test_a_chain_that_returns_to_a_key_it_left_is_refused(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    k0, k1, *_ = keys
    chain = (*chain_to(keys, 1), endorse("primes", k1, k0.public_key()))
    with pytest.raises(BundleError, match="leads back to key"):
        verify_bundle(pack(tmp_path, 2, k0, chain), k0.public_key())


# --- the owner's tool ----------------------------------------------------------------------


def test_rotate_and_pack_on_the_command_line(
    tmp_path: Path, keys: list[Ed25519PrivateKey], capsys: pytest.CaptureFixture[str]
) -> None:
    chain_file = tmp_path / "primes.chain.json"
    for old, new in (("k0", "k1"), ("k1", "k2")):
        args = ["rotate", "--project", "primes", "--old", str(tmp_path / f"{old}.pem")]
        args += ["--new", str(tmp_path / f"{new}.pem.pub"), "--out", str(chain_file)]
        assert project_main(args) == 0
    assert [e.new_key for e in read_chain(chain_file)] == [pub(keys[1]), pub(keys[2])]
    # Rotating again from a key that no longer signs is refused.
    args = ["rotate", "--project", "primes", "--old", str(tmp_path / "k0.pem")]
    args += ["--new", str(tmp_path / "x.pem.pub"), "--out", str(chain_file)]
    assert project_main(args) == 1
    assert "not at the old key" in capsys.readouterr().err
    src, out = project_dir(tmp_path, 5), tmp_path / "v5.issc"
    pack_args = ["pack", str(src), "--key", str(tmp_path / "k2.pem"), "--out", str(out)]
    assert project_main([*pack_args, "--endorsements", str(chain_file)]) == 0
    assert project_main(["verify", str(out), "--pubkey", str(tmp_path / "k0.pem.pub")]) == 0
    assert "key rotations walked: 2" in capsys.readouterr().out
    # Packing with a key the chain does not end at is refused before anything is written.
    bad = ["pack", str(src), "--key", str(tmp_path / "k1.pem"), "--out", str(tmp_path / "b.issc")]
    assert project_main([*bad, "--endorsements", str(chain_file)]) == 1
    assert "chain ends at" in capsys.readouterr().err
    assert not (tmp_path / "b.issc").exists()


# --- the node ------------------------------------------------------------------------------


def put_part(cache: BundleCache, bundle: Path) -> str:
    """Place a bundle as a complete download; return its digest."""
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    shutil.copyfile(bundle, cache.directory / f"{digest}.part")
    return digest


def test_the_node_follows_a_rotation_remembers_it_and_refuses_a_rollback(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    k0, k1, k2, _x = keys
    directory = tmp_path / "cache"
    cache = BundleCache(directory, {"primes": pub(k0)})
    v1 = put_part(cache, pack(tmp_path, 1, k0))
    cache.install(v1, "primes")
    assert not (directory / OWNER_KEYS_FILE).exists()  # nothing rotated yet
    v2 = put_part(cache, pack(tmp_path, 2, k1, chain_to(keys, 1)))
    cache.install(v2, "primes")
    assert cache.owner_key("primes") == (pub(k1), frozenset({pub(k0)}))
    state = json.loads((directory / OWNER_KEYS_FILE).read_text())
    assert state == {"primes": {"current": pub(k1), "superseded": [pub(k0)]}}

    # A restart: a new cache object on the same directory, same node.yaml (still K0).
    cache = BundleCache(directory, {"primes": pub(k0)})
    assert cache.owner_key("primes") == (pub(k1), frozenset({pub(k0)}))
    # A new bundle signed by the old key (stolen, say) is a rollback: refused.
    v3 = put_part(cache, pack(tmp_path, 3, k0))
    with pytest.raises(BundleError, match="a rollback to an old key is refused"):
        cache.install(v3, "primes")
    # Even with an endorsement by the new key back to the old one.
    back = (*chain_to(keys, 1), endorse("primes", k1, k0.public_key()))
    v4 = put_part(cache, pack(tmp_path, 4, k0, back))
    with pytest.raises(BundleError, match="a rollback to an old key is refused"):
        cache.install(v4, "primes")
    # The cached v1, signed by K0, is not used any more either.
    with pytest.raises(BundleError, match="a rollback to an old key is refused"):
        cache.check_owner(v1, "primes")
    cache.check_owner(v2, "primes")
    # Further rotations walk on; the chain always starts at the first key.
    v5 = put_part(cache, pack(tmp_path, 5, k2, chain_to(keys, 2)))
    cache.install(v5, "primes")
    assert cache.owner_key("primes") == (pub(k2), frozenset({pub(k0), pub(k1)}))
    with pytest.raises(BundleError, match="a rollback to an old key is refused"):
        cache.install(put_part(cache, pack(tmp_path, 6, k1, chain_to(keys, 1))), "primes")


def test_a_node_offline_during_rotations_walks_the_whole_chain(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    cache = BundleCache(tmp_path / "cache", {"primes": pub(keys[0])})
    digest = put_part(cache, pack(tmp_path, 7, keys[2], chain_to(keys, 2)))
    cache.install(digest, "primes")
    assert cache.owner_key("primes") == (pub(keys[2]), frozenset({pub(keys[0]), pub(keys[1])}))


def test_a_volunteer_who_pins_another_key_by_hand_is_obeyed(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    k0, k1, _k2, x = keys
    directory = tmp_path / "cache"
    cache = BundleCache(directory, {"primes": pub(k0)})
    cache.install(put_part(cache, pack(tmp_path, 2, k1, chain_to(keys, 1))), "primes")
    # node.yaml still names K0, or already K1: the rotation holds.
    again = BundleCache(directory, {"primes": pub(k1)}).owner_key("primes")
    assert again is not None and again[0] == pub(k1)
    # node.yaml names a key outside the rotation: the volunteer re-pinned on purpose.
    assert BundleCache(directory, {"primes": pub(x)}).owner_key("primes") == (pub(x), frozenset())


def test_an_unreadable_key_state_refuses_rather_than_forgets(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    directory = tmp_path / "cache"
    cache = BundleCache(directory, {"primes": pub(keys[0])})
    (directory / OWNER_KEYS_FILE).write_text("{not json")
    digest = put_part(cache, pack(tmp_path, 1, keys[0]))
    with pytest.raises(BundleError, match=OWNER_KEYS_FILE):
        cache.install(digest, "primes")


# --- the hub -------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Inbox, Store, Path]:
    store = Store(f"sqlite:///{tmp_path}/hub.db")
    store.create_schema()
    root = tmp_path / "inbox"
    return Inbox(root, store, ContentStore(tmp_path / "files"), settle=False), store, root


def drop(hub: tuple[Inbox, Store, Path], bundle: Path) -> str | None:
    """Drop a bundle into the inbox and scan: None if accepted, else the rejection note."""
    inbox, _store, root = hub
    shutil.copyfile(bundle, root / bundle.name)
    inbox.scan()
    note = root / "rejected" / f"{bundle.name}.error.txt"
    if note.exists():
        return note.read_text()
    assert (root / "accepted" / bundle.name).exists()
    return None


def pinned_at_hub(hub: tuple[Inbox, Store, Path]) -> str:
    current = hub[1].current_bundle("primes")
    assert current is not None
    return current[0]


def test_the_hub_moves_its_pin_along_a_chain_and_refuses_a_rollback(
    tmp_path: Path, keys: list[Ed25519PrivateKey], hub: tuple[Inbox, Store, Path]
) -> None:
    k0, k1, k2, x = keys
    assert drop(hub, pack(tmp_path, 1, k0)) is None
    assert pinned_at_hub(hub) == pub(k0)
    # Another key without an endorsement: refused, as before rotation existed.
    note = drop(hub, pack(tmp_path, 2, x))
    assert note is not None and "no endorsement from the trusted key" in note
    assert drop(hub, pack(tmp_path, 2, k1, chain_to(keys, 1))) is None
    assert pinned_at_hub(hub) == pub(k1)
    # The old key, stolen: a rollback, refused.
    note = drop(hub, pack(tmp_path, 3, k0))
    assert note is not None and "a rollback to an old key is refused" in note
    # The old key endorsing the thief's key: the chain does not pass through K1.
    note = drop(hub, pack(tmp_path, 3, x, (endorse("primes", k0, x.public_key()),)))
    assert note is not None and "does not pass through the trusted key" in note
    # A bundle by the current key must still carry the chain (nodes pinned at K0 need it).
    note = drop(hub, pack(tmp_path, 3, k1))
    assert note is not None and "does not carry the key rotation chain" in note
    assert drop(hub, pack(tmp_path, 3, k1, chain_to(keys, 1))) is None
    assert drop(hub, pack(tmp_path, 4, k2, chain_to(keys, 2))) is None
    assert pinned_at_hub(hub) == pub(k2)


@pytest.mark.parametrize("case", sorted(BAD_CHAINS))
def test_the_hub_refuses_bad_chains_naming_the_cause(
    tmp_path: Path, keys: list[Ed25519PrivateKey], hub: tuple[Inbox, Store, Path], case: str
) -> None:
    assert drop(hub, pack(tmp_path, 1, keys[0])) is None
    build, cause = BAD_CHAINS[case]
    signer, chain = build(keys)
    note = drop(hub, pack(tmp_path, 2, keys[signer], chain))
    assert note is not None and cause.split(" (")[0] in note, note
    assert pinned_at_hub(hub) == pub(keys[0])


def test_parse_public_key_of_an_endorsed_key(keys: list[Ed25519PrivateKey]) -> None:
    link = endorse("primes", keys[0], keys[1].public_key())
    assert parse_public_key(link.new_key).public_bytes_raw() == raw(keys[1])
    with pytest.raises(BundleError, match="the new key is the old key"):
        endorse("primes", keys[0], keys[0].public_key())
    with pytest.raises(BundleError, match="not a project name"):
        endorse("Bad Name", keys[0], keys[1].public_key())


def test_the_manifest_carries_the_chain_and_is_unchanged_without_one(
    tmp_path: Path, keys: list[Ed25519PrivateKey]
) -> None:
    spec = parse_project_yaml(project_dir(tmp_path, 1) / "project.yaml")
    plain = spec.to_manifest((), pub(keys[0]))
    assert b"endorsements" not in manifest_to_bytes(plain)  # the same bytes as before
    rotated = spec.to_manifest((), pub(keys[2]), chain_to(keys, 2))
    assert manifest_from_bytes(manifest_to_bytes(rotated)) == rotated
    document = json.loads(manifest_to_bytes(rotated))
    document["endorsements"][0]["signature"] = "AAAA"
    with pytest.raises(BundleError, match=r"endorsements\[0\]\.signature: must be 64 bytes"):
        manifest_from_bytes(json.dumps(document).encode())
    document["endorsements"] = []
    with pytest.raises(BundleError, match="endorsements: must be a non-empty list"):
        manifest_from_bytes(json.dumps(document).encode())
