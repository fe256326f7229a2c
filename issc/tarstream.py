"""A minimal strict reader for the tar archives ``issc.bundle`` writes, and nothing else.

Bundles come from untrusted hubs and project owners, so reading one must not let a crafted
header cost unbounded time or memory. Python's ``tarfile`` cannot promise that: its PAX
extended-header parser has had quadratic-time and endless-loop bugs on crafted input
(CVE-2024-6232, CVE-2025-8194), and it reads a whole extended header into memory before a
caller can object. ``issc.bundle_pack`` writes bundles with ``tarfile`` (POSIX PAX format),
but they are read back only through this module, which understands exactly that subset:

* POSIX ustar headers, each optionally preceded by one small PAX extended header carrying
  ``path`` and ``size`` (the timestamp and owner records other writers add are ignored);
* regular members read as a stream, followed by the zero end-of-archive blocks.

Every extended header is bounded (``_MAX_PAX_HEADER_BYTES``) and parsed in one linear pass;
anything unusual (GNU long names, global or Solaris headers, chained extended headers,
unknown PAX records) is refused. ``BoundedReader`` caps the decompressed bytes read, which
is what stops a gzip bomb. Structural damage raises ``ArchiveError``; a bound exceeded raises
``BundleError``. What the members must be is ``issc.bundle``'s business, not this module's.
"""

from __future__ import annotations

import gzip
import tarfile
from dataclasses import dataclass

from issc.errors import BundleError

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 1024 * 1024
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
MEMBER_OVERHEAD = 3 * _BLOCK + _MAX_PAX_HEADER_BYTES
ARCHIVE_OVERHEAD = 64 * 1024


class ArchiveError(Exception):
    """The archive's structure is broken; reported as ``not a valid bundle archive``."""


class BoundedReader:
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
            ArchiveError: the stream ends first (``what`` says what was being read).
        """
        parts: list[bytes] = []
        missing = size
        while missing > 0:
            chunk = self.read(missing)
            if not chunk:
                raise ArchiveError(f"unexpected end of data in {what}")
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class TarMember:
    """One member header: its name (undecodable bytes kept as surrogates), type and size."""

    name: str
    kind: bytes
    size: int


class TarStream:
    """A strict streaming reader for the tar subset pack_bundle writes: POSIX ustar headers,
    each optionally preceded by one small PAX extended header.

    tarfile is not used for reading because its PAX parser has had quadratic-time and
    endless-loop bugs on crafted headers (CVE-2024-6232, CVE-2025-8194) and reads a whole
    extended header into memory before a caller can object. Here every extended header is
    bounded, parsed in linear time, and anything unusual (GNU long names, global headers,
    chained extended headers) is refused.
    """

    def __init__(self, reader: BoundedReader) -> None:
        self._reader = reader
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0  # zero bytes after the current member's data

    def next_member(self) -> TarMember | None:
        """Return the next member header, or None at the end-of-archive marker.

        Raises:
            ArchiveError: a corrupt or unsupported header.
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
            raise ArchiveError(f"unsupported tar header type {member.kind!r}")
        self._remaining = member.size
        self._padding = -member.size % _BLOCK
        return member

    def _apply_pax(self, pax: TarMember) -> TarMember:
        """Read a PAX extended header and the member header it applies to."""
        if pax.size > _MAX_PAX_HEADER_BYTES:
            raise BundleError(
                f"PAX header of {pax.size} bytes, over the limit of {_MAX_PAX_HEADER_BYTES}"
            )
        data = self._reader.read_exact(pax.size + (-pax.size % _BLOCK), "a PAX header")
        records = _parse_pax_records(data[: pax.size])
        block = self._reader.read_exact(_BLOCK, "a member header")
        if block == _ZERO_BLOCK:
            raise ArchiveError("PAX header without a member")
        member = _parse_header(block)
        if member.kind == tarfile.XHDTYPE or member.kind in _REFUSED_HEADER_TYPES:
            raise ArchiveError("an extended header must be followed by a member header")
        name = records.get(b"path")
        size = records.get(b"size")
        return TarMember(
            name=member.name if name is None else name.decode("utf-8", "surrogateescape"),
            kind=member.kind,
            size=member.size if size is None else _parse_decimal(size, "PAX size"),
        )

    def read(self, size: int) -> bytes:
        """Read up to ``size`` bytes of the current member's data; b"" when it is all read.

        Raises:
            ArchiveError: the archive ends inside the member's data.
        """
        size = min(size, self._remaining)
        if size <= 0:
            return b""
        data = self._reader.read(size)
        if not data:
            raise ArchiveError("unexpected end of data in a member")
        self._remaining -= len(data)
        return data

    def finish(self) -> None:
        """After the end marker, check only zero padding follows; reaching the end of the
        gzip stream also makes gzip check its CRC and length.

        Raises:
            ArchiveError: non-zero data after the end-of-archive marker.
            BundleError: more padding than the bound allows.
        """
        while chunk := self._reader.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                raise ArchiveError("data after the end of the archive")

    def _skip_rest_of_member(self) -> None:
        """Move past unread data and padding of the current member."""
        while self.read(_CHUNK):
            pass
        if self._padding:
            self._reader.read_exact(self._padding, "member padding")
            self._padding = 0


def _parse_header(block: bytes) -> TarMember:
    """Parse one 512-byte POSIX ustar header.

    Raises:
        ArchiveError: bad checksum, not a POSIX ustar header, or a bad size field.
    """
    stored = _parse_octal(block[148:156], "header checksum")
    # The checksum is the byte sum of the header with the checksum field read as spaces.
    if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise ArchiveError("bad tar header checksum")
    if block[257:265] != b"ustar\x0000":
        raise ArchiveError("not a POSIX ustar header")
    name = _nul_terminated(block[0:100])
    prefix = _nul_terminated(block[345:500])
    raw_name = prefix + b"/" + name if prefix else name
    return TarMember(
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
        ArchiveError: anything but octal digits.
    """
    digits = _nul_terminated(field).strip(b" ")
    if not digits:
        return 0
    if not all(0x30 <= b <= 0x37 for b in digits):
        raise ArchiveError(f"bad {what}")
    return int(digits, 8)


def _parse_decimal(value: bytes, what: str) -> int:
    """Parse a short ASCII decimal number. Raises ArchiveError otherwise."""
    if not value or len(value) > 20 or not all(0x30 <= b <= 0x39 for b in value):
        raise ArchiveError(f"bad {what}")
    return int(value)


def _parse_pax_records(data: bytes) -> dict[bytes, bytes]:
    """Parse ``"<length> <key>=<value>\\n"`` records in one linear pass.

    Only ``path`` and ``size`` are used; the timestamp and owner records other tar writers
    add are ignored; anything else is refused, as are repeated keys.

    Raises:
        ArchiveError: a malformed, unknown or repeated record.
    """
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space < 0:
            raise ArchiveError("bad PAX record length")
        length = _parse_decimal(data[pos:space], "PAX record length")
        end = pos + length
        if end > len(data) or end <= space + 1 or data[end - 1 : end] != b"\n":
            raise ArchiveError("bad PAX record")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals or not key:
            raise ArchiveError("bad PAX record")
        if key in records:
            raise ArchiveError(f"repeated PAX record {key!r}")
        if key not in _USED_PAX_KEYS and key not in _IGNORED_PAX_KEYS:
            raise ArchiveError(f"unsupported PAX record {key!r}")
        records[key] = value
        pos = end
    return records
