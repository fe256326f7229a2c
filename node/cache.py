"""Verified project bundles, cached by digest, and the highest version run per project.

A bundle is downloaded to ``<digest>.part`` (so a cut download resumes where it
stopped), checked against its SHA-256 digest, verified against the owner key pinned in
``trusted_keys``, and extracted read-only to ``<digest>/``. Only an extracted directory
is ever run; anything that fails verification is deleted and never retried.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from issc.bundle import extract_bundle, read_manifest
from issc.errors import BundleError
from issc.fsutil import sha256_file
from issc.keys import parse_public_key
from issc.manifest import Manifest
from node.transfer import append_part

MAX_BUNDLE_SIZE = 256 * 1024 * 1024


class BundleCache:
    def __init__(self, directory: Path, trusted_keys: dict[str, str]) -> None:
        self.directory = directory
        self.trusted_keys = trusted_keys
        self.versions_file = directory / "versions.json"
        directory.mkdir(parents=True, exist_ok=True)
        self.refused: dict[str, str] = {}  # digest -> why; never fetched again this run
        self._manifests: dict[str, Manifest] = {}

    def ready(self, digest: str) -> Path | None:
        """The extracted directory of a verified bundle, if cached."""
        path = self.directory / digest
        # The archive is moved in last: a directory without it is a crash's leftover.
        return path if path.is_dir() and (self.directory / f"{digest}.issc").exists() else None

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
            key_text = self.trusted_keys.get(project)
            if key_text is None:
                raise BundleError(f"no trusted key for project {project!r}")
            target = self.directory / digest
            shutil.rmtree(target, ignore_errors=True)  # left by a crash before the rename below
            manifest = extract_bundle(part, parse_public_key(key_text), target)
            if manifest.name != project:
                shutil.rmtree(target, ignore_errors=True)
                raise BundleError(f"bundle is for project {manifest.name!r}, not {project!r}")
            os.replace(part, archive)
        except BundleError as exc:
            part.unlink(missing_ok=True)
            # The reason travels to the hub and the owner: it must not reveal local paths.
            reason = str(exc).replace(f"{part}: ", "").replace(str(self.directory), "<cache>")
            self.refused[digest] = reason
            raise BundleError(reason) from None
        self._manifests[digest] = manifest
        return self.directory / digest

    # ---- versions already run (never go back) -------------------------------------------

    def highest_version(self, project: str) -> int:
        return self._versions().get(project, 0)

    def record_version(self, project: str, version: int) -> None:
        versions = self._versions()
        if versions.get(project, 0) >= version:
            return
        versions[project] = version
        tmp = self.versions_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(versions), encoding="utf-8")
        os.replace(tmp, self.versions_file)

    def _versions(self) -> dict[str, int]:
        try:
            data = json.loads(self.versions_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return (
            {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}
        )
