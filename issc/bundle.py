"""Pack, sign, verify and safely extract project bundles (``*.issc``).

A bundle is a gzip-compressed tar archive holding, in this order:

1. ``manifest.json``: the canonical manifest bytes (see ``issc.manifest``);
2. ``signature``: 64 raw bytes, the Ed25519 signature over ``SIGNATURE_DOMAIN + manifest``;
3. ``files/<path>`` for every file of the manifest, sorted by path.

The fixed order lets a reader check the signature before it reads a single file byte,
and then check each file's size against the signed manifest before reading its data:
the archive is read as a stream, and nothing is read past a bound. Verification never
trusts tar metadata beyond the member's name, type and size; the signed manifest is the
authority on paths, sizes, hashes and the executable bit.

This module owns the layout, the signature and the bounds, and holds the public API.
Packing (walking, hashing, writing the archive with tarfile in POSIX PAX format) lives in
``issc.bundle_pack``. Reading does not use tarfile: untrusted archives go through
``issc.tarstream``, a small strict reader for exactly that subset, so that no header can
make the reader allocate or loop beyond the bounds below.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from issc.bundle_pack import collect_sources, refuse_private_key, write_archive, write_atomically
from issc.errors import BundleError, KeyFormatError
from issc.fsutil import sha256_file
from issc.keys import load_private_key, parse_public_key, public_key_string
from issc.manifest import (
    MAX_PATH_CHARS,
    Endorsement,
    FileEntry,
    Manifest,
    manifest_from_bytes,
    manifest_to_bytes,
    parse_project_yaml,
    unsafe_path_reason,
)
from issc.rotation import check_chain, read_chain, trusted_owner_key
from issc.tarstream import (
    ARCHIVE_OVERHEAD,
    MEMBER_OVERHEAD,
    ArchiveError,
    BoundedReader,
    TarMember,
    TarStream,
)

# Domain separation: a bundle signature can never be replayed as a signature of anything else.
SIGNATURE_DOMAIN = b"issc-bundle-v1\0"
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "signature"
FILES_PREFIX = "files/"
PROJECT_YAML = "project.yaml"
SIGNATURE_BYTES = 64

MAX_TOTAL_BYTES = 256 * 1024 * 1024  # sum of all file sizes
MAX_FILES = 10_000
# A member name is "files/" plus a manifest path, and a manifest path is at most 255 chars.
MAX_MEMBER_NAME_CHARS = len(FILES_PREFIX) + MAX_PATH_CHARS
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# The decompressed bytes allowed before the signed manifest says how much to expect.
_HEAD_BUDGET = 2 * MEMBER_OVERHEAD + MAX_MANIFEST_BYTES + SIGNATURE_BYTES + ARCHIVE_OVERHEAD
_CHUNK = 1024 * 1024

KeyChoice = Callable[[Manifest], Ed25519PublicKey]
# A pinned key (verify against it, walking a rotation chain from it), or a choice that
# decides for itself (a node that also remembers superseded keys, say).
Trust = Ed25519PublicKey | KeyChoice


# --- packing -------------------------------------------------------------------------------


def pack_bundle(
    src_dir: Path, key_path: Path, out: Path, endorsements: Path | None = None
) -> Manifest:
    """Pack ``src_dir`` into a signed bundle at ``out`` (atomically); return its manifest.

    ``endorsements``: a chain file (``issc-project rotate``) leading from the project's
    first key to ``key_path``'s; it is copied into the signed manifest.

    Raises:
        BundleError: a bad project.yaml (names file and key), a symlink, special file or
            unsafe name under ``src_dir`` (names it), a bound exceeded, the private key
            lying inside ``src_dir``, ``out`` cannot be written, or a bad chain file or
            one that does not end at the signing key.
        KeyFormatError: ``key_path`` is not a usable Ed25519 private key.
    """
    key = load_private_key(key_path)
    spec = parse_project_yaml(src_dir / PROJECT_YAML)
    owner_key = public_key_string(key.public_key())
    chain: tuple[Endorsement, ...] = ()
    if endorsements is not None:
        chain = read_chain(endorsements)
        try:
            check_chain(spec.name, chain, owner_key)
        except BundleError as exc:
            raise BundleError(f"{endorsements}: {exc}") from None
    sources = collect_sources(
        src_dir, skip=out, max_files=MAX_FILES, max_total_bytes=MAX_TOTAL_BYTES
    )
    refuse_private_key(sources, key_path)
    manifest = spec.to_manifest(
        files=tuple(s.entry for s in sources), owner_key=owner_key, endorsements=chain
    )
    manifest_bytes = manifest_to_bytes(manifest)
    head = (
        (MANIFEST_MEMBER, manifest_bytes),
        (SIGNATURE_MEMBER, sign_manifest(manifest_bytes, key)),
    )
    write_atomically(out, lambda fh: write_archive(fh, head, FILES_PREFIX, sources))
    return manifest


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """Return the 64-byte bundle signature over ``SIGNATURE_DOMAIN + manifest_bytes``."""
    return key.sign(SIGNATURE_DOMAIN + manifest_bytes)


# --- reading and verifying -----------------------------------------------------------------


def read_manifest(path: Path) -> Manifest:
    """Read and validate the manifest of a bundle without any trust decision.

    The signature is not checked: the hub uses this to learn a bundle's name and version.

    Raises:
        BundleError: the file is unreadable, not a bundle archive, or its manifest is bad.
    """
    return _scan(path, choose_key=None, staging=None)


def read_manifest_bytes(data: bytes) -> Manifest:
    """read_manifest for a bundle held in memory (the hub's stored bundles).

    Raises:
        BundleError: not a bundle archive, or its manifest is bad.
    """
    return _scan(Path("<bundle>"), choose_key=None, staging=None, data=data)


def _key_choice(trusted: Trust) -> KeyChoice:
    """A pinned key becomes a choice that walks a rotation chain from it (issc.rotation)."""
    if isinstance(trusted, Ed25519PublicKey):
        pinned = public_key_string(trusted)
        return lambda manifest: trusted_owner_key(manifest, pinned)
    return trusted


def verify_bundle(path: Path, trusted_key: Trust) -> Manifest:
    """Verify a bundle against ``trusted_key`` and return its manifest.

    A bundle signed by another key is accepted only if it carries an endorsement chain
    from ``trusted_key`` to its signer (see ``issc.rotation``).

    Raises:
        BundleError: bad signature, owner key not ``trusted_key`` nor endorsed from it, a
            bad endorsement chain, an unsafe, non-regular, unexpected or missing member, a
            size or SHA-256 mismatch, a bound exceeded, or a corrupt archive. The message
            names the bundle and the cause.
    """
    return _scan(path, choose_key=_key_choice(trusted_key), staging=None)


def verify_self_signed(path: Path) -> Manifest:
    """Verify a bundle against the owner key its own manifest names.

    This proves integrity, not trust: the caller must pin the key (the hub pins the first
    key it saw for each project, and moves the pin only along an endorsement chain). The
    bundle's endorsement chain, if any, is checked too.

    Raises:
        BundleError: as verify_bundle.
    """
    return _scan(path, choose_key=_owner_key_of, staging=None)


def extract_bundle(path: Path, trusted_key: Trust, dest: Path) -> Manifest:
    """Verify a bundle against ``trusted_key`` (as verify_bundle) and extract its files
    into ``dest``.

    Files are written into a fresh hidden directory beside ``dest`` while they are verified,
    and that directory is renamed to ``dest`` only once everything verified; on any failure
    it is removed. Files get mode 0o444 (0o555 if executable), directories 0o755.

    Raises:
        BundleError: ``dest`` exists, it cannot be written, or anything verify_bundle refuses.
    """
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest}: destination already exists")
    try:
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    except OSError as exc:
        raise BundleError(f"{dest}: cannot create a directory beside it: {exc.strerror}") from exc
    try:
        manifest = _scan(path, choose_key=_key_choice(trusted_key), staging=staging)
        _fix_directory_modes(staging)
        os.rename(staging, dest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"{dest}: cannot extract: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def bundle_digest(path: Path) -> str:
    """Return the SHA-256 (hex) of the bundle file's bytes.

    Raises:
        BundleError: the file cannot be read.
    """
    try:
        return sha256_file(path)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from exc


def _owner_key_of(manifest: Manifest) -> Ed25519PublicKey:
    """The key a self-signed bundle claims (already validated by manifest_from_bytes),
    once its endorsement chain checked out."""
    check_chain(manifest.name, manifest.endorsements, manifest.owner_key)
    try:
        return parse_public_key(manifest.owner_key)
    except KeyFormatError as exc:  # unreachable after validation; kept as a guard
        raise BundleError(f"manifest.json: owner_key: {exc}") from exc


@contextmanager
def _errors_name_bundle(path: Path) -> Iterator[None]:
    """Prefix every BundleError with the bundle path; translate archive-level errors."""
    try:
        yield
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    except (ArchiveError, EOFError, zlib.error, OSError) as exc:
        # gzip.BadGzipFile is an OSError; EOFError is a truncated gzip stream.
        raise BundleError(f"{path}: not a valid bundle archive: {exc}") from exc


def _scan(
    path: Path, choose_key: KeyChoice | None, staging: Path | None, data: bytes | None = None
) -> Manifest:
    """Read a bundle as one stream, checking everything; optionally write files to ``staging``.

    With ``choose_key`` None only the manifest is read and nothing is verified. ``data``:
    the bundle's bytes, read instead of ``path`` (which then only names it).

    Raises:
        BundleError: see verify_bundle; every message starts with the bundle path.
    """
    with _errors_name_bundle(path):
        try:
            raw: BinaryIO = io.BytesIO(data) if data is not None else path.open("rb")
        except OSError as exc:
            raise BundleError(f"cannot read: {exc.strerror}") from exc
        with raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            reader = BoundedReader(gz, _HEAD_BUDGET)
            tar = TarStream(reader)
            manifest_bytes = _read_small_member(tar, MANIFEST_MEMBER, MAX_MANIFEST_BYTES)
            manifest = manifest_from_bytes(manifest_bytes)
            _check_bounds(manifest)
            if choose_key is None:
                return manifest
            signature = _read_small_member(tar, SIGNATURE_MEMBER, SIGNATURE_BYTES)
            _check_signature(manifest, manifest_bytes, signature, choose_key(manifest))
            reader.limit = reader.consumed + _archive_budget(manifest)
            _read_files(tar, manifest, staging)
            tar.finish()
    return manifest


def _check_bounds(manifest: Manifest) -> None:
    """Raises BundleError if the manifest declares more files or bytes than allowed."""
    if len(manifest.files) > MAX_FILES:
        raise BundleError(f"manifest declares {len(manifest.files)} files, over {MAX_FILES}")
    total = sum(f.size for f in manifest.files)
    if total > MAX_TOTAL_BYTES:
        raise BundleError(f"manifest declares {total} bytes of files, over {MAX_TOTAL_BYTES}")


def _archive_budget(manifest: Manifest) -> int:
    """Decompressed bytes the rest of the archive may take, given the signed manifest."""
    data = sum(f.size for f in manifest.files)
    return data + MEMBER_OVERHEAD * len(manifest.files) + ARCHIVE_OVERHEAD


def _check_signature(
    manifest: Manifest, manifest_bytes: bytes, signature: bytes, key: Ed25519PublicKey
) -> None:
    """Raises BundleError unless ``signature`` verifies with ``key`` and the manifest names it."""
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError(f"signature: must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        key.verify(signature, SIGNATURE_DOMAIN + manifest_bytes)
    except InvalidSignature:
        hint = ""
        if manifest.owner_key != public_key_string(key) and not manifest.endorsements:
            hint = (
                "; a bundle signed by a rotated key must carry the endorsement chain "
                "(issc-project pack --endorsements)"
            )
        raise BundleError(
            "signature does not verify with the trusted key "
            f"(the manifest names owner key {manifest.owner_key}){hint}"
        ) from None
    expected = public_key_string(key)
    if manifest.owner_key != expected:
        raise BundleError(
            f"manifest owner_key {manifest.owner_key} is not the trusted key {expected}"
        )


def _show(name: str) -> str:
    """A member name safe to print: as is if plain, else repr, and never too long."""
    shown = name if name.isprintable() and name.strip() == name else repr(name)
    return shown if len(shown) <= 300 else shown[:300] + "..."


def _check_member(member: TarMember) -> None:
    """Raises BundleError unless the member is a regular file with a safe name."""
    if member.kind not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        # Directory names end in "/"; strip it so the message names the directory.
        raise BundleError(f"member {_show(member.name.rstrip('/'))}: not a regular file")
    reason = unsafe_path_reason(member.name, max_chars=MAX_MEMBER_NAME_CHARS)
    if reason is not None:
        raise BundleError(f"member {_show(member.name)}: unsafe path ({reason})")


def _read_small_member(tar: TarStream, name: str, max_size: int) -> bytes:
    """Read the next member, which must be the regular file ``name`` of at most ``max_size``.

    Raises:
        BundleError: the member is missing, misplaced, unsafe, not regular, or too large.
    """
    member = tar.next_member()
    if member is None:
        raise BundleError(f"missing member {name}")
    _check_member(member)
    if member.name != name:
        raise BundleError(f"expected member {name}, found {_show(member.name)}")
    if member.size > max_size:
        raise BundleError(f"member {name}: {member.size} bytes, over the limit of {max_size}")
    parts = []
    while chunk := tar.read(_CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _read_files(tar: TarStream, manifest: Manifest, staging: Path | None) -> None:
    """Check that the remaining members are exactly the manifest's files, byte for byte.

    Raises:
        BundleError: an unsafe, non-regular, unexpected, duplicate or missing member, or a
            size or SHA-256 mismatch.
    """
    expected = {FILES_PREFIX + f.path: f for f in manifest.files}
    seen: set[str] = set()
    while (member := tar.next_member()) is not None:
        _check_member(member)
        entry = expected.get(member.name)
        if entry is None:
            raise BundleError(f"unexpected member {_show(member.name)}")
        if member.name in seen:
            raise BundleError(f"duplicate member {_show(member.name)}")
        seen.add(member.name)
        if member.size != entry.size:
            raise BundleError(
                f"file {entry.path}: size mismatch (manifest {entry.size}, archive {member.size})"
            )
        _check_file_data(tar, entry, staging)
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BundleError(f"missing member {_show(missing[0])}{more}")


def _check_file_data(tar: TarStream, entry: FileEntry, staging: Path | None) -> None:
    """Hash one file's data (writing it under ``staging`` if given) and compare.

    Raises:
        BundleError: its SHA-256 differs from the manifest.
        ArchiveError: the archive ends inside the data.
    """
    digest = hashlib.sha256()
    with _open_staged(staging, entry) as out:
        while chunk := tar.read(_CHUNK):
            digest.update(chunk)
            if out is not None:
                _write_staged(out, chunk, entry)
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"file {entry.path}: SHA-256 mismatch")


@contextmanager
def _open_staged(staging: Path | None, entry: FileEntry) -> Iterator[BinaryIO | None]:
    """Create ``staging/entry.path`` for writing (or yield None when only verifying).

    The path was validated (relative, no ``..``) and every directory under ``staging`` was
    made by us, so the file lands inside ``staging``; O_EXCL and O_NOFOLLOW make sure we
    never write through something that was already there.

    Raises:
        BundleError: the file or its directories cannot be created or finished.
    """
    if staging is None:
        yield None
        return
    target = staging.joinpath(*entry.path.split("/"))
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise BundleError(f"cannot create extracted file {entry.path}: {exc}") from exc
    with os.fdopen(fd, "wb") as out:
        yield out
        try:
            out.flush()
            os.fchmod(out.fileno(), 0o555 if entry.executable else 0o444)
        except OSError as exc:
            raise BundleError(f"cannot write extracted file {entry.path}: {exc}") from exc


def _write_staged(out: BinaryIO, chunk: bytes, entry: FileEntry) -> None:
    """Write verified-so-far data; kept apart so a full disk is not called a bad archive.

    Raises:
        BundleError: the write fails.
    """
    try:
        out.write(chunk)
    except OSError as exc:
        raise BundleError(f"cannot write extracted file {entry.path}: {exc}") from exc


def _fix_directory_modes(staging: Path) -> None:
    """Give every extracted directory mode 0o755 (mkdtemp makes 0o700; umask may strip bits)."""
    os.chmod(staging, 0o755)
    for root, dirs, _files in os.walk(staging):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
