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

Packing uses tarfile (POSIX PAX format). Reading does not: untrusted archives go through
``_TarStream``, a small strict reader for exactly that subset, so that no header can make
the reader allocate or loop beyond the bounds below.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from issc.errors import BundleError, KeyFormatError
from issc.keys import load_private_key, parse_public_key, public_key_string
from issc.manifest import (
    MAX_PATH_CHARS,
    FileEntry,
    Manifest,
    manifest_from_bytes,
    manifest_to_bytes,
    parse_project_yaml,
    unsafe_path_reason,
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

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# Our PAX headers only carry long or non-ASCII paths: ~1 KiB at most for a 261-char name.
_MAX_PAX_HEADER_BYTES = 8192
_USED_PAX_KEYS = frozenset({b"path", b"size"})
_IGNORED_PAX_KEYS = frozenset({b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname"})
# GNU long names, global PAX headers, Solaris extended headers: never written by pack_bundle.
_REFUSED_HEADER_TYPES = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
)
# Tar framing around the data, worst case per member: PAX header block, PAX data, member
# header, padding. The archive ends with zero blocks padded to a 10 KiB record. These bound
# how many decompressed bytes a reader accepts beyond what the manifest declares.
_MEMBER_OVERHEAD = 3 * _BLOCK + _MAX_PAX_HEADER_BYTES
_ARCHIVE_OVERHEAD = 64 * 1024
_HEAD_BUDGET = 2 * _MEMBER_OVERHEAD + MAX_MANIFEST_BYTES + SIGNATURE_BYTES + _ARCHIVE_OVERHEAD
_CHUNK = 1024 * 1024
_FILE_MODE = 0o644
_EXEC_MODE = 0o755

KeyChoice = Callable[[Manifest], Ed25519PublicKey]


# --- packing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    """A file found under the project directory, hashed once for the manifest."""

    disk_path: Path
    entry: FileEntry


def pack_bundle(src_dir: Path, key_path: Path, out: Path) -> Manifest:
    """Pack ``src_dir`` into a signed bundle at ``out`` (atomically); return its manifest.

    Raises:
        BundleError: a bad project.yaml (names file and key), a symlink, special file or
            unsafe name under ``src_dir`` (names it), a bound exceeded, the private key
            lying inside ``src_dir``, or ``out`` cannot be written.
        KeyFormatError: ``key_path`` is not a usable Ed25519 private key.
    """
    key = load_private_key(key_path)
    spec = parse_project_yaml(src_dir / PROJECT_YAML)
    sources = _collect_sources(src_dir, skip=out)
    _refuse_private_key(sources, key_path)
    manifest = spec.to_manifest(
        files=tuple(s.entry for s in sources), owner_key=public_key_string(key.public_key())
    )
    _write_atomically(out, lambda fh: _write_archive(fh, manifest, sources, key))
    return manifest


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """Return the 64-byte bundle signature over ``SIGNATURE_DOMAIN + manifest_bytes``."""
    return key.sign(SIGNATURE_DOMAIN + manifest_bytes)


def _collect_sources(src_dir: Path, skip: Path) -> list[_Source]:
    """Find and hash every file to pack, sorted by bundle path.

    Skips dot-files and dot-dirs, ``__pycache__``, ``*.pyc`` and the output file itself.

    Raises:
        BundleError: ``src_dir`` unreadable, a symlink or special file, an unsafe path, or
            more than MAX_FILES files or MAX_TOTAL_BYTES in total.
    """
    if not src_dir.is_dir():
        raise BundleError(f"{src_dir}: not a directory")
    skip_resolved = skip.resolve()
    sources: list[_Source] = []
    total = 0
    for disk_path in _walk(src_dir):
        if disk_path.resolve() == skip_resolved:
            continue  # an earlier bundle written into the project directory
        rel = disk_path.relative_to(src_dir).as_posix()
        reason = unsafe_path_reason(rel)
        if reason is not None:
            raise BundleError(f"{disk_path}: cannot be packed: {reason}")
        source = _hash_source(disk_path, rel)
        total += source.entry.size
        sources.append(source)
        if len(sources) > MAX_FILES:
            raise BundleError(f"{src_dir}: more than {MAX_FILES} files")
        if total > MAX_TOTAL_BYTES:
            raise BundleError(f"{src_dir}: files exceed {MAX_TOTAL_BYTES} bytes in total")
    return sorted(sources, key=lambda s: s.entry.path)


def _walk(directory: Path) -> Iterator[Path]:
    """Yield regular files under ``directory``, recursively, never following symlinks.

    Raises:
        BundleError: a symlink or special file (names it), or a directory cannot be listed.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise BundleError(f"{directory}: cannot list: {exc.strerror}") from exc
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            raise BundleError(f"{path}: symbolic links cannot be packed")
        if entry.is_dir(follow_symlinks=False):
            if entry.name != "__pycache__":
                yield from _walk(path)
        elif entry.is_file(follow_symlinks=False):
            if not entry.name.endswith(".pyc"):
                yield path
        else:
            raise BundleError(f"{path}: not a regular file; special files cannot be packed")


def _hash_source(disk_path: Path, rel: str) -> _Source:
    """Hash one file for the manifest.

    Raises:
        BundleError: the file cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with disk_path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise BundleError(f"{disk_path}: cannot read: {exc.strerror}") from exc
    entry = FileEntry(
        path=rel, size=size, sha256=digest.hexdigest(), executable=bool(mode & stat.S_IXUSR)
    )
    return _Source(disk_path=disk_path, entry=entry)


def _refuse_private_key(sources: list[_Source], key_path: Path) -> None:
    """Refuse to publish the signing key by packing it along with the project.

    Raises:
        BundleError: ``key_path`` is one of the files about to be packed.
    """
    key_resolved = key_path.resolve()
    for source in sources:
        if source.disk_path.resolve() == key_resolved:
            raise BundleError(
                f"{key_path}: the private key lies inside the project directory and would be "
                "published in the bundle; move it elsewhere"
            )


def _write_archive(
    fh: BinaryIO, manifest: Manifest, sources: list[_Source], key: Ed25519PrivateKey
) -> None:
    """Write the deterministic gzip'd tar: fixed order, mtime 0, owner 0, fixed modes.

    Raises:
        BundleError: a file changed or vanished between hashing and packing.
        OSError: the output cannot be written (the caller names the file).
    """
    manifest_bytes = manifest_to_bytes(manifest)
    # filename="" keeps the temp file's name out of the gzip header; mtime=0 keeps time out.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _add_bytes(tar, MANIFEST_MEMBER, manifest_bytes)
        _add_bytes(tar, SIGNATURE_MEMBER, sign_manifest(manifest_bytes, key))
        for source in sources:
            _add_source(tar, source)


def _tar_info(name: str, size: int, executable: bool) -> tarfile.TarInfo:
    """A TarInfo with every metadata field fixed, so packing is reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = _EXEC_MODE if executable else _FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add an in-memory member."""
    tar.addfile(_tar_info(name, len(data), executable=False), io.BytesIO(data))


def _add_source(tar: tarfile.TarFile, source: _Source) -> None:
    """Add one project file, re-hashing what is actually written.

    Raises:
        BundleError: the file's content no longer matches the manifest.
    """
    entry = source.entry
    info = _tar_info(FILES_PREFIX + entry.path, entry.size, entry.executable)
    try:
        with source.disk_path.open("rb") as fh:
            reader = _HashingReader(fh)
            tar.addfile(info, reader)
    except OSError as exc:
        raise BundleError(f"{source.disk_path}: changed while packing ({exc})") from exc
    if reader.hexdigest() != entry.sha256:
        raise BundleError(f"{source.disk_path}: changed while packing")


class _HashingReader:
    """Wraps a binary file and hashes every byte read through it."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._digest.update(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _write_atomically(out: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``out`` through a hidden temp file in the same directory, then os.replace it.

    Raises:
        BundleError: the file cannot be written (names ``out``), or whatever ``write`` raises.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise BundleError(f"{out}: cannot create: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)  # a bundle is public; mkstemp made it 0600
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"{out}: cannot write: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- reading and verifying -----------------------------------------------------------------


def read_manifest(path: Path) -> Manifest:
    """Read and validate the manifest of a bundle without any trust decision.

    The signature is not checked: the hub uses this to learn a bundle's name and version.

    Raises:
        BundleError: the file is unreadable, not a bundle archive, or its manifest is bad.
    """
    return _scan(path, choose_key=None, staging=None)


def verify_bundle(path: Path, trusted_key: Ed25519PublicKey) -> Manifest:
    """Verify a bundle against ``trusted_key`` and return its manifest.

    Raises:
        BundleError: bad signature, owner key not ``trusted_key``, an unsafe, non-regular,
            unexpected or missing member, a size or SHA-256 mismatch, a bound exceeded, or a
            corrupt archive. The message names the bundle and the cause.
    """
    return _scan(path, choose_key=lambda _manifest: trusted_key, staging=None)


def verify_self_signed(path: Path) -> Manifest:
    """Verify a bundle against the owner key its own manifest names.

    This proves integrity, not trust: the caller must pin the key (the hub pins the first
    key it saw for each project).

    Raises:
        BundleError: as verify_bundle.
    """
    return _scan(path, choose_key=_owner_key_of, staging=None)


def extract_bundle(path: Path, trusted_key: Ed25519PublicKey, dest: Path) -> Manifest:
    """Verify a bundle against ``trusted_key`` and extract its files into ``dest``.

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
        manifest = _scan(path, choose_key=lambda _manifest: trusted_key, staging=staging)
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
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from exc
    return digest.hexdigest()


def _owner_key_of(manifest: Manifest) -> Ed25519PublicKey:
    """The key a self-signed bundle claims (already validated by manifest_from_bytes)."""
    try:
        return parse_public_key(manifest.owner_key)
    except KeyFormatError as exc:  # unreachable after validation; kept as a guard
        raise BundleError(f"manifest.json: owner_key: {exc}") from exc


class _ArchiveError(Exception):
    """The archive's structure is broken; reported as ``not a valid bundle archive``."""


class _BoundedReader:
    """The decompressed archive stream, refusing to yield more than ``limit`` bytes.

    This is what stops a gzip bomb: the read that would cross the limit raises instead of
    decompressing further. The limit grows once the signed manifest says how much to expect.
    """

    def __init__(self, inner: gzip.GzipFile, limit: int) -> None:
        self._inner = inner
        self.limit = limit
        self.consumed = 0

    def read(self, size: int) -> bytes:
        """Read up to ``size`` bytes; b"" only at the real end of the stream.

        Raises:
            BundleError: the stream goes on past ``limit``.
        """
        allowed = self.limit - self.consumed
        if size > allowed:
            if allowed <= 0:
                # Exactly at the limit is fine only if the stream really ends here.
                if self._inner.read(1):
                    raise BundleError("archive holds more data than its manifest allows")
                return b""
            size = allowed
        data = self._inner.read(size)
        self.consumed += len(data)
        return data

    def read_exact(self, size: int, what: str) -> bytes:
        """Read exactly ``size`` bytes.

        Raises:
            _ArchiveError: the stream ends first (``what`` says what was being read).
        """
        parts: list[bytes] = []
        missing = size
        while missing > 0:
            chunk = self.read(missing)
            if not chunk:
                raise _ArchiveError(f"unexpected end of data in {what}")
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class _TarMember:
    """One member header: its name (undecodable bytes kept as surrogates), type and size."""

    name: str
    kind: bytes
    size: int


class _TarStream:
    """A strict streaming reader for the tar subset pack_bundle writes: POSIX ustar headers,
    each optionally preceded by one small PAX extended header.

    tarfile is not used for reading because its PAX parser has had quadratic-time and
    endless-loop bugs on crafted headers (CVE-2024-6232, CVE-2025-8194) and reads a whole
    extended header into memory before a caller can object. Here every extended header is
    bounded, parsed in linear time, and anything unusual (GNU long names, global headers,
    chained extended headers) is refused.
    """

    def __init__(self, reader: _BoundedReader) -> None:
        self._reader = reader
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0  # zero bytes after the current member's data

    def next_member(self) -> _TarMember | None:
        """Return the next member header, or None at the end-of-archive marker.

        Raises:
            _ArchiveError: a corrupt or unsupported header.
            BundleError: an extended header over _MAX_PAX_HEADER_BYTES.
        """
        self._skip_rest_of_member()
        block = self._reader.read_exact(_BLOCK, "a member header")
        if block == _ZERO_BLOCK:
            return None
        member = _parse_header(block)
        if member.kind == tarfile.XHDTYPE:
            member = self._apply_pax(member)
        elif member.kind in _REFUSED_HEADER_TYPES:
            raise _ArchiveError(f"unsupported tar header type {member.kind!r}")
        self._remaining = member.size
        self._padding = -member.size % _BLOCK
        return member

    def _apply_pax(self, pax: _TarMember) -> _TarMember:
        """Read a PAX extended header and the member header it applies to."""
        if pax.size > _MAX_PAX_HEADER_BYTES:
            raise BundleError(
                f"PAX header of {pax.size} bytes, over the limit of {_MAX_PAX_HEADER_BYTES}"
            )
        data = self._reader.read_exact(pax.size + (-pax.size % _BLOCK), "a PAX header")
        records = _parse_pax_records(data[: pax.size])
        block = self._reader.read_exact(_BLOCK, "a member header")
        if block == _ZERO_BLOCK:
            raise _ArchiveError("PAX header without a member")
        member = _parse_header(block)
        if member.kind == tarfile.XHDTYPE or member.kind in _REFUSED_HEADER_TYPES:
            raise _ArchiveError("an extended header must be followed by a member header")
        name = records.get(b"path")
        size = records.get(b"size")
        return _TarMember(
            name=member.name if name is None else name.decode("utf-8", "surrogateescape"),
            kind=member.kind,
            size=member.size if size is None else _parse_decimal(size, "PAX size"),
        )

    def read(self, size: int) -> bytes:
        """Read up to ``size`` bytes of the current member's data; b"" when it is all read.

        Raises:
            _ArchiveError: the archive ends inside the member's data.
        """
        size = min(size, self._remaining)
        if size <= 0:
            return b""
        data = self._reader.read(size)
        if not data:
            raise _ArchiveError("unexpected end of data in a member")
        self._remaining -= len(data)
        return data

    def finish(self) -> None:
        """After the end marker, check only zero padding follows; reaching the end of the
        gzip stream also makes gzip check its CRC and length.

        Raises:
            _ArchiveError: non-zero data after the end-of-archive marker.
            BundleError: more padding than the bound allows.
        """
        while chunk := self._reader.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                raise _ArchiveError("data after the end of the archive")

    def _skip_rest_of_member(self) -> None:
        """Move past unread data and padding of the current member."""
        while self.read(_CHUNK):
            pass
        if self._padding:
            self._reader.read_exact(self._padding, "member padding")
            self._padding = 0


def _parse_header(block: bytes) -> _TarMember:
    """Parse one 512-byte POSIX ustar header.

    Raises:
        _ArchiveError: bad checksum, not a POSIX ustar header, or a bad size field.
    """
    stored = _parse_octal(block[148:156], "header checksum")
    # The checksum is the byte sum of the header with the checksum field read as spaces.
    if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise _ArchiveError("bad tar header checksum")
    if block[257:265] != b"ustar\x0000":
        raise _ArchiveError("not a POSIX ustar header")
    name = _nul_terminated(block[0:100])
    prefix = _nul_terminated(block[345:500])
    raw_name = prefix + b"/" + name if prefix else name
    return _TarMember(
        name=raw_name.decode("utf-8", "surrogateescape"),
        kind=block[156:157],
        size=_parse_octal(block[124:136], "size field"),
    )


def _nul_terminated(field: bytes) -> bytes:
    """The bytes of a tar string field up to its first NUL."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _parse_octal(field: bytes, what: str) -> int:
    """Parse a NUL- or space-terminated octal number (base-256 sizes are never needed here).

    Raises:
        _ArchiveError: anything but octal digits.
    """
    digits = _nul_terminated(field).strip(b" ")
    if not digits:
        return 0
    if not all(0x30 <= b <= 0x37 for b in digits):
        raise _ArchiveError(f"bad {what}")
    return int(digits, 8)


def _parse_decimal(value: bytes, what: str) -> int:
    """Parse a short ASCII decimal number. Raises _ArchiveError otherwise."""
    if not value or len(value) > 20 or not all(0x30 <= b <= 0x39 for b in value):
        raise _ArchiveError(f"bad {what}")
    return int(value)


def _parse_pax_records(data: bytes) -> dict[bytes, bytes]:
    """Parse ``"<length> <key>=<value>\\n"`` records in one linear pass.

    Only ``path`` and ``size`` are used; the timestamp and owner records other tar writers
    add are ignored; anything else is refused, as are repeated keys.

    Raises:
        _ArchiveError: a malformed, unknown or repeated record.
    """
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            raise _ArchiveError("bad PAX record length")
        length = _parse_decimal(data[pos:space], "PAX record length")
        end = pos + length
        if end > len(data) or end <= space + 1 or data[end - 1 : end] != b"\n":
            raise _ArchiveError("bad PAX record")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise _ArchiveError("bad PAX record")
        if key in records:
            raise _ArchiveError(f"repeated PAX record {key!r}")
        if key not in _USED_PAX_KEYS and key not in _IGNORED_PAX_KEYS:
            raise _ArchiveError(f"unsupported PAX record {key!r}")
        records[key] = value
        pos = end
    return records


@contextmanager
def _errors_name_bundle(path: Path) -> Iterator[None]:
    """Prefix every BundleError with the bundle path; translate archive-level errors."""
    try:
        yield
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    except (_ArchiveError, EOFError, zlib.error, OSError) as exc:
        # gzip.BadGzipFile is an OSError; EOFError is a truncated gzip stream.
        raise BundleError(f"{path}: not a valid bundle archive: {exc}") from exc


def _scan(path: Path, choose_key: KeyChoice | None, staging: Path | None) -> Manifest:
    """Read a bundle as one stream, checking everything; optionally write files to ``staging``.

    With ``choose_key`` None only the manifest is read and nothing is verified.

    Raises:
        BundleError: see verify_bundle; every message starts with the bundle path.
    """
    with _errors_name_bundle(path):
        try:
            raw = path.open("rb")
        except OSError as exc:
            raise BundleError(f"cannot read: {exc.strerror}") from exc
        with raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            reader = _BoundedReader(gz, _HEAD_BUDGET)
            tar = _TarStream(reader)
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
    return data + _MEMBER_OVERHEAD * len(manifest.files) + _ARCHIVE_OVERHEAD


def _check_signature(
    manifest: Manifest, manifest_bytes: bytes, signature: bytes, key: Ed25519PublicKey
) -> None:
    """Raises BundleError unless ``signature`` verifies with ``key`` and the manifest names it."""
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError(f"signature: must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        key.verify(signature, SIGNATURE_DOMAIN + manifest_bytes)
    except InvalidSignature:
        raise BundleError(
            "signature does not verify with the trusted key "
            f"(the manifest names owner key {manifest.owner_key})"
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


def _check_member(member: _TarMember) -> None:
    """Raises BundleError unless the member is a regular file with a safe name."""
    if member.kind not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        # Directory names end in "/"; strip it so the message names the directory.
        raise BundleError(f"member {_show(member.name.rstrip('/'))}: not a regular file")
    reason = unsafe_path_reason(member.name, max_chars=MAX_MEMBER_NAME_CHARS)
    if reason is not None:
        raise BundleError(f"member {_show(member.name)}: unsafe path ({reason})")


def _read_small_member(tar: _TarStream, name: str, max_size: int) -> bytes:
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


def _read_files(tar: _TarStream, manifest: Manifest, staging: Path | None) -> None:
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


def _check_file_data(tar: _TarStream, entry: FileEntry, staging: Path | None) -> None:
    """Hash one file's data (writing it under ``staging`` if given) and compare.

    Raises:
        BundleError: its SHA-256 differs from the manifest.
        _ArchiveError: the archive ends inside the data.
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
