"""Verified project bundles, cached by digest, and the highest version run per project.

A bundle is downloaded to ``<digest>.part`` (so a cut download resumes where it
stopped), checked against its SHA-256 digest, verified against the owner key pinned in
``trusted_keys``, and extracted read-only to ``<digest>/``. Only an extracted directory
is ever run; anything that fails verification is deleted and never retried.

Owner key rotation (``issc.rotation``): a bundle signed by a key other than the pinned
one is accepted only with an endorsement chain from the pinned key; the node then
remembers the new key as the project's current key, and the keys it walked past as
superseded, in ``owner_keys.json`` (written atomically and fsynced), and refuses bundles
signed by a superseded key from then on, across restarts. The remembered key applies
while ``trusted_keys`` still names the key it started from (or the current one); a
volunteer who writes a different key there has re-pinned the project by hand.

A cached directory is re-verified before it is used (``ready``): the first use in each
node process hashes the kept archive (against its digest, which was verified with the
signature) and every extracted file against the signed manifest, and checks that no file
is missing, added or of another mode; later uses compare a cheap stat fingerprint of the
tree (kind, mode, size, inode, mtime and ctime of every entry) with the one taken at the
last full check, and check fully again if it changed. A corrupt entry is deleted, so the
caller fetches it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Collection
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from issc.bundle import KeyChoice, extract_bundle, read_manifest
from issc.errors import BundleError
from issc.fsutil import fsync_dir, sha256_file
from issc.manifest import Manifest
from issc.rotation import check_rotation, short_key, trusted_owner_key, walked_keys
from node.transfer import append_part

log = logging.getLogger(__name__)

MAX_BUNDLE_SIZE = 256 * 1024 * 1024
# Entries (files and directories) up to which a bundle's stat fingerprint is taken on the
# event loop (``quick_ready``): a few microseconds each, while a thread hop costs more than
# a small bundle's whole fingerprint. Larger bundles are looked at in a worker thread.
QUICK_ENTRIES = 64
OWNER_KEYS_FILE = "owner_keys.json"
_CHUNK = 1024 * 1024
_DIR_MODE = 0o755

# (relative path, file type and permission bits, size, inode, mtime ns, ctime ns) per entry
Fingerprint = tuple[tuple[str, int, int, int, int, int], ...]


class CorruptEntry(Exception):
    """A cached bundle directory differs from its signed manifest (the message says how)."""


class BundleCache:
    def __init__(self, directory: Path, trusted_keys: dict[str, str]) -> None:
        self.directory = directory
        self.trusted_keys = trusted_keys
        self.versions_file = directory / "versions.json"
        directory.mkdir(parents=True, exist_ok=True)
        self.owner_keys_file = directory / OWNER_KEYS_FILE
        self._owner_states: dict[str, tuple[str, frozenset[str]]] | None = None  # read once
        self.refused: dict[str, str] = {}  # digest -> why; never fetched again this run
        self._manifests: dict[str, Manifest] = {}
        # digest -> the tree's fingerprint when it last passed a full check (this process)
        self._checked: dict[str, Fingerprint] = {}
        self._lock = threading.Lock()  # ready() runs in worker threads; keys are shared
        # versions.json, read once: only this node writes it, and every offer asks for it.
        self._versions_read: dict[str, int] | None = None

    def ready(self, digest: str) -> Path | None:
        """The extracted directory of a verified bundle, if cached and still intact.

        A corrupt entry (see the module docstring) is deleted and None returned, so that
        the caller fetches the bundle again. Blocking (it may hash the bundle): call it
        from a worker thread.
        """
        path = self.directory / digest
        # The archive is moved in last: a directory without it is a crash's leftover.
        if not (path.is_dir() and (self.directory / f"{digest}.issc").exists()):
            return None
        with self._lock:
            try:
                self._reverify(digest)
            except CorruptEntry as exc:
                log.warning(
                    "cached bundle %s is corrupt (%s); deleting it to fetch it again",
                    digest[:12],
                    exc,
                )
                self._discard(digest)
                return None
        return path

    def quick_ready(self, digest: str) -> Path | None:
        """The extracted directory, if this process verified it fully and its stat
        fingerprint is unchanged since (the check ``ready`` makes on every later use),
        for bundles small enough to look at on the event loop (QUICK_ENTRIES); None
        when ``ready`` has to decide: never checked, changed, large, missing, or a full
        check in progress in a worker thread. Never raises, never blocks on the lock."""
        known = self._checked.get(digest)
        if known is None or len(known) > QUICK_ENTRIES or not self._lock.acquire(blocking=False):
            return None
        try:
            path = self.directory / digest
            try:
                unchanged = _fingerprint(path, self.directory / f"{digest}.issc") == known
            except OSError:
                return None
            return path if unchanged and self._checked.get(digest) == known else None
        finally:
            self._lock.release()

    def _reverify(self, digest: str) -> None:
        """Raises CorruptEntry unless the cached entry matches its signed manifest."""
        path = self.directory / digest
        archive = self.directory / f"{digest}.issc"
        try:
            # Taken before the check: a change made during it shows at the next use.
            fingerprint = _fingerprint(path, archive)
        except OSError as exc:
            raise CorruptEntry(f"cannot look at it: {exc}") from None
        if self._checked.get(digest) == fingerprint:
            return
        self._checked.pop(digest, None)
        try:
            if sha256_file(archive) != digest:
                raise CorruptEntry("the kept archive no longer has its SHA-256")
            manifest = read_manifest(archive)
            _check_tree(path, manifest)
        except (OSError, BundleError) as exc:
            raise CorruptEntry(str(exc).replace(str(self.directory), "<cache>")) from None
        self._manifests[digest] = manifest
        self._checked[digest] = fingerprint

    def _discard(self, digest: str) -> None:
        """Delete a cached entry (directory and archive), whatever its modes."""
        self._checked.pop(digest, None)
        self._manifests.pop(digest, None)
        path = self.directory / digest
        if path.is_dir() and not path.is_symlink():
            for root, dirs, _files in os.walk(path):
                for name in dirs:  # a directory made read-only would stop rmtree
                    child = os.path.join(root, name)
                    if not os.path.islink(child):
                        os.chmod(child, _DIR_MODE)
            os.chmod(path, _DIR_MODE)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        (self.directory / f"{digest}.issc").unlink(missing_ok=True)

    def check_owner(self, digest: str, project: str) -> None:
        """Refuse a cached bundle signed by a key this node saw superseded (a rollback).

        Raises:
            BundleError: naming the superseded key.
        """
        signer = self.manifest(digest).owner_key
        pinned = self.owner_key(project)
        if pinned is not None and signer in pinned[1]:
            raise BundleError(
                f"signed by owner key {short_key(signer)}, which a rotation has replaced by "
                f"{short_key(pinned[0])}; a rollback to an old key is refused"
            )

    def manifest(self, digest: str) -> Manifest:
        """The manifest of a cached bundle (read from the kept archive)."""
        if digest not in self._manifests:
            self._manifests[digest] = read_manifest(self.directory / f"{digest}.issc")
        return self._manifests[digest]

    def partial_size(self, digest: str) -> int:
        part = self.directory / f"{digest}.part"
        return part.stat().st_size if part.exists() else 0

    def append_chunk(self, digest: str, offset: int, total: int, data: bytes) -> bool:
        """Add a chunk at ``offset``; True once all ``total`` bytes are there.

        Raises BundleError (and deletes the download) if the hub sends an out-of-order
        chunk or an oversized bundle.
        """
        part = self.directory / f"{digest}.part"
        try:
            return append_part(part, offset, total, data, MAX_BUNDLE_SIZE)
        except ValueError as exc:
            part.unlink(missing_ok=True)
            raise BundleError(f"bundle download refused: {exc}") from None

    def adopt(self, digest: str, project: str, archive: Path) -> Path:
        """Verify and extract a copy of a complete archive held elsewhere on this node
        (a relay's cache); like ``install``, raises BundleError."""
        part = self.directory / f"{digest}.part"
        try:
            shutil.copyfile(archive, part)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise BundleError(f"cannot copy the bundle: {exc.strerror}") from None
        return self.install(digest, project)

    def install(self, digest: str, project: str) -> Path:
        """Verify a complete download and extract it; returns the directory.

        Raises BundleError (and deletes the download) if the digest, the signature
        against the pinned key, the project name, or any file's hash is wrong.
        """
        part = self.directory / f"{digest}.part"
        archive = self.directory / f"{digest}.issc"
        try:
            actual = sha256_file(part)
            if actual != digest:
                raise BundleError(
                    f"downloaded bundle has SHA-256 {actual[:16]}…, not {digest[:16]}…"
                )
            pinned = self.owner_key(project)
            if pinned is None:
                raise BundleError(f"no trusted key for project {project!r}")
            current, superseded = pinned
            target = self.directory / digest
            self._discard(digest)  # left by a crash before the rename below
            manifest = extract_bundle(part, self._key_choice(project, current, superseded), target)
            try:
                self._adopt_key(project, manifest, current)
            except BundleError:
                self._discard(digest)
                raise
            os.replace(part, archive)
        except BundleError as exc:
            part.unlink(missing_ok=True)
            # The reason travels to the hub and the owner: it must not reveal local paths.
            reason = str(exc).replace(f"{part}: ", "").replace(str(self.directory), "<cache>")
            self.refused[digest] = reason
            raise BundleError(reason) from None
        self._manifests[digest] = manifest
        with self._lock, contextlib.suppress(OSError):
            # Just verified while extracted: its first use needs no second full check.
            self._checked[digest] = _fingerprint(self.directory / digest, archive)
        return self.directory / digest

    # ---- owner keys (rotation) -----------------------------------------------------------

    def owner_key(self, project: str) -> tuple[str, frozenset[str]] | None:
        """(current owner key, superseded keys) of a project, or None if none is trusted."""
        configured = self.trusted_keys.get(project)
        if configured is None:
            return None
        configured = configured.strip()
        state = self._owner_keys().get(project)
        if state is not None:
            current, superseded = state
            if configured == current or configured in superseded:
                return current, superseded
        return configured, frozenset()  # no rotation seen, or re-pinned by hand

    def _key_choice(self, project: str, current: str, superseded: Collection[str]) -> KeyChoice:
        def choose(manifest: Manifest) -> Ed25519PublicKey:
            if manifest.name != project:  # before the chain: its links name the project
                raise BundleError(f"bundle is for project {manifest.name!r}, not {project!r}")
            return trusted_owner_key(manifest, current, superseded)

        return choose

    def _adopt_key(self, project: str, manifest: Manifest, current: str) -> None:
        """Remember a rotation that ``manifest`` (verified from ``current``) made.

        Raises:
            BundleError: another bundle moved the key on meanwhile and this one is signed
                by a key now superseded; or the state cannot be written.
        """
        if manifest.owner_key == current:
            return
        with self._lock:
            pinned = self.owner_key(project)
            if pinned is None or pinned[0] != current:  # another install rotated meanwhile
                now_current, superseded = pinned if pinned is not None else (current, frozenset())
                check_rotation(manifest, now_current, superseded)  # raises if superseded
                current = now_current
            else:
                superseded = pinned[1]
            if manifest.owner_key == current:
                return
            walked = superseded | set(walked_keys(manifest, current))
            states = self._owner_keys()
            states[project] = (manifest.owner_key, frozenset(walked))
            try:
                self._write_owner_keys(states)
            except OSError as exc:
                raise BundleError(f"cannot remember the rotated owner key: {exc}") from None
        log.info(
            "project %s: owner key rotated from %s to %s (endorsed)",
            project,
            short_key(current),
            short_key(manifest.owner_key),
        )

    def _owner_keys(self) -> dict[str, tuple[str, frozenset[str]]]:
        """The rotations seen, read once (only this node writes the file) and kept."""
        if self._owner_states is None:
            self._owner_states = self._read_owner_keys()
        return dict(self._owner_states)

    def _read_owner_keys(self) -> dict[str, tuple[str, frozenset[str]]]:
        try:
            data = json.loads(self.owner_keys_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Losing the superseded keys would re-open rollbacks: refuse, do not forget.
            raise BundleError(f"cannot read {OWNER_KEYS_FILE}: {exc}") from None
        out: dict[str, tuple[str, frozenset[str]]] = {}
        if isinstance(data, dict):
            for name, entry in data.items():
                if not isinstance(entry, dict):
                    continue
                current, superseded = entry.get("current"), entry.get("superseded")
                if isinstance(current, str) and isinstance(superseded, list):
                    out[name] = (current, frozenset(k for k in superseded if isinstance(k, str)))
        return out

    def _write_owner_keys(self, states: dict[str, tuple[str, frozenset[str]]]) -> None:
        """Write owner_keys.json atomically and durably. Raises OSError."""
        document = {
            name: {"current": current, "superseded": sorted(superseded)}
            for name, (current, superseded) in sorted(states.items())
        }
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{OWNER_KEYS_FILE}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(document, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.owner_keys_file)
            fsync_dir(self.directory)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._owner_states = dict(states)

    # ---- versions already run (never go back) -------------------------------------------

    def highest_version(self, project: str) -> int:
        return self._versions().get(project, 0)

    def record_version(self, project: str, version: int) -> None:
        """Remember that ``version`` of ``project`` ran. A version not above the highest
        recorded costs a dict lookup; a new one is written durably first.

        Raises OSError if it cannot be written (the version is then not recorded).
        """
        versions = self._versions()
        if versions.get(project, 0) >= version:
            return
        versions = {**versions, project: version}
        # Durably (temp file, fsync, rename, fsync of the directory): a version recorded is
        # one the node ran, and a crash must not let it accept an older one afterwards.
        directory = self.versions_file.parent
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.versions_file.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(versions, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.versions_file)
            fsync_dir(directory)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._versions_read = versions  # kept only once on disk

    def _versions(self) -> dict[str, int]:
        """The highest version run per project (read from versions.json once, then kept:
        only this process writes the file while it runs). Do not mutate the result."""
        if self._versions_read is None:
            self._versions_read = self._read_versions()
        return self._versions_read

    def _read_versions(self) -> dict[str, int]:
        try:
            data = json.loads(self.versions_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return (
            {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}
        )


def _fingerprint(path: Path, archive: Path) -> Fingerprint:
    """Stat every entry under ``path`` (not following symlinks) and the archive.

    Taken before every use of a cached bundle, often on the event loop
    (``quick_ready``): plain os calls and string paths, no pathlib.

    Raises:
        OSError: something vanished or cannot be listed.
    """
    entries = []
    for item in (archive, path):
        info = os.lstat(item)
        entries.append((item.name, info.st_mode, info.st_size, info.st_ino,
                        info.st_mtime_ns, info.st_ctime_ns))  # fmt: skip
    stack = [(os.fspath(path), "")]  # (directory, its path relative to ``path`` + "/")
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                rel = prefix + entry.name
                entries.append((rel, info.st_mode, info.st_size, info.st_ino,
                                info.st_mtime_ns, info.st_ctime_ns))  # fmt: skip
                if stat.S_ISDIR(info.st_mode):
                    stack.append((entry.path, rel + "/"))
    return tuple(sorted(entries))


def _check_tree(path: Path, manifest: Manifest) -> None:
    """Check the extracted tree is exactly the manifest's files, as extract_bundle made it.

    Raises:
        BundleError: a file missing, added, changed, of another type or mode (names it).
    """
    expected = {f.path: f for f in manifest.files}
    directories = {"/".join(p.split("/")[:i]) for p in expected for i in range(1, p.count("/") + 1)}
    seen: set[str] = set()
    stack = [path]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as listing:
            for entry in listing:
                rel = Path(entry.path).relative_to(path).as_posix()
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode) and rel in directories:
                    if stat.S_IMODE(info.st_mode) != _DIR_MODE:
                        raise BundleError(f"directory {rel}: mode changed")
                    stack.append(Path(entry.path))
                    continue
                file = expected.get(rel)
                if file is None or not stat.S_ISREG(info.st_mode):
                    raise BundleError(f"{rel}: not a file of the bundle (added or replaced)")
                seen.add(rel)
                if stat.S_IMODE(info.st_mode) != (0o555 if file.executable else 0o444):
                    raise BundleError(f"file {rel}: mode changed")
                if info.st_size != file.size:
                    raise BundleError(f"file {rel}: size changed")
                if _sha256_nofollow(Path(entry.path)) != file.sha256:
                    raise BundleError(f"file {rel}: content changed (SHA-256 mismatch)")
    missing = sorted(set(expected) - seen)
    if missing:
        raise BundleError(f"file {missing[0]}: missing")
    top = os.lstat(path)
    if stat.S_IMODE(top.st_mode) != _DIR_MODE:
        raise BundleError("the bundle directory: mode changed")


def _sha256_nofollow(path: Path) -> str:
    """SHA-256 of a regular file, opened without following a symlink. Raises OSError."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
