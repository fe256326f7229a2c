"""What a signed project bundle declares: name, version, how to run it, its limits, its files."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from issc.errors import BundleError, KeyFormatError
from issc.keys import parse_public_key

ExecutionMode = Literal["process", "persistent"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for one task run, from project.yaml's ``limits``."""

    wall_seconds: float = 600.0
    memory_mb: int = 512
    output_mb: int = 64


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a bundle: its relative POSIX path, size and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str
    executable: bool = False


@dataclass(frozen=True, slots=True)
class Endorsement:
    """One key rotation: ``old_key`` signed (project, new_key); see issc.rotation."""

    project: str
    old_key: str
    new_key: str
    signature: bytes  # 64 raw bytes


@dataclass(frozen=True, slots=True)
class Manifest:
    """The signed description of one version of a project."""

    name: str
    version: int
    entrypoint: tuple[str, ...]
    mode: ExecutionMode
    limits: Limits
    quorum: int
    files: tuple[FileEntry, ...]
    owner_key: str  # "ed25519:<base64>" of the key that signed this manifest
    # Relative tolerance when replicas' numbers are compared (quorum); None: exact equality.
    tolerance: float | None = None
    # Key rotations, oldest first: each link says the old key endorsed the new one; the last
    # link's new key is owner_key. Checked by issc.rotation (structure here, signatures there).
    endorsements: tuple[Endorsement, ...] = ()


# --- project.yaml and the signed manifest.json ------------------------------------------
#
# project.yaml is what the owner writes; manifest.json is what gets signed: the same fields
# plus the file list and the owner's key. Both are validated by one set of checkers so the
# rules cannot drift apart. Every error is a BundleError naming the source and key path.

MANIFEST_FORMAT = 1
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
MAX_PATH_CHARS = 255
MAX_ENTRYPOINT_ITEMS = 64
# Integers end up in database columns; 32-bit signed fits every SQL backend's INTEGER.
MAX_INT = 2**31 - 1
MAX_PROJECT_YAML_BYTES = 1024 * 1024
EXECUTION_MODES: tuple[ExecutionMode, ...] = ("process", "persistent")

_PROJECT_KEYS = ("name", "version", "entrypoint", "mode", "limits", "quorum", "tolerance")
_REQUIRED_PROJECT_KEYS = ("name", "version", "entrypoint")
_LIMIT_KEYS = ("wall_seconds", "memory_mb", "output_mb")
_MANIFEST_KEYS = (*_PROJECT_KEYS, "files", "owner_key", "format", "endorsements")
# ``tolerance`` is optional in manifest.json too: a bundle that declares none signs the
# same bytes as before the key existed.
_REQUIRED_MANIFEST_KEYS = tuple(
    key for key in _MANIFEST_KEYS if key not in ("tolerance", "endorsements")
)
_FILE_KEYS = ("path", "size", "sha256", "executable")
# ``endorsements`` is optional too, and written only when there is one (no rotation: the
# same bytes as before the key existed).
_ENDORSEMENT_KEYS = ("project", "old_key", "new_key", "signature")
MAX_ENDORSEMENTS = 64
ENDORSEMENT_SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class ProjectSpec:
    """The validated content of project.yaml: a Manifest without files and owner key."""

    name: str
    version: int
    entrypoint: tuple[str, ...]
    mode: ExecutionMode = "process"
    limits: Limits = Limits()
    quorum: int = 1
    tolerance: float | None = None

    def to_manifest(
        self,
        files: tuple[FileEntry, ...],
        owner_key: str,
        endorsements: tuple[Endorsement, ...] = (),
    ) -> Manifest:
        """Combine this spec with the bundle's files, the signer's public key string and
        the endorsement chain that leads to it (if the key was ever rotated)."""
        return Manifest(
            name=self.name,
            version=self.version,
            entrypoint=self.entrypoint,
            mode=self.mode,
            limits=self.limits,
            quorum=self.quorum,
            files=files,
            owner_key=owner_key,
            tolerance=self.tolerance,
            endorsements=endorsements,
        )


def unsafe_path_reason(path: str, max_chars: int = MAX_PATH_CHARS) -> str | None:
    """Say why ``path`` is not a safe relative POSIX path inside a bundle, or None if it is.

    Safe means: 1..max_chars chars, valid UTF-8, no NUL, backslash or other control
    character, not absolute, and no empty, ``.`` or ``..`` component. Control characters
    are refused too because paths end up in logs and terminals.
    """
    if not path:
        return "empty path"
    if len(path) > max_chars:
        return f"longer than {max_chars} characters"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if "\0" in path:
        return "contains NUL"
    if "\\" in path:
        return "contains a backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        return "contains a control character"
    if path.startswith("/"):
        return "absolute path"
    for part in path.split("/"):
        if part == "":
            return "has an empty component"
        if part in (".", ".."):
            return f"has a {part!r} component"
    return None


class _Checker:
    """Validates values from one source (a file label) and raises BundleError naming it."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> BundleError:
        """Build the error for ``key``; callers ``raise`` it so control flow stays visible."""
        return BundleError(
            f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}"
        )

    def mapping(
        self, value: object, key: str, allowed: tuple[str, ...], required: tuple[str, ...]
    ) -> dict[str, object]:
        """Check ``value`` is a mapping with string keys, no unknown and no missing ones."""
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        prefix = f"{key}." if key else ""
        for item in value:
            if not isinstance(item, str):
                raise self.fail(key, f"key {item!r} must be a string")
            if item not in allowed:
                raise self.fail(
                    prefix + item, f"unknown key (expected one of: {', '.join(allowed)})"
                )
        for item in required:
            if item not in value:
                raise self.fail(prefix + item, "required")
        return {str(k): v for k, v in value.items()}

    def integer(self, value: object, key: str, minimum: int, message: str) -> int:
        """Check ``value`` is an int (bools are not) within ``minimum..MAX_INT``."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, message)
        if value > MAX_INT:
            raise self.fail(key, f"must be at most {MAX_INT}")
        return value

    def positive_number(self, value: object, key: str) -> float:
        """Check ``value`` is a finite int or float > 0 (bools are not numbers here)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "must be a positive number")
        number = float(value)
        if not (math.isfinite(number) and number > 0):
            raise self.fail(key, "must be a positive number")
        return number

    def tolerance(self, value: object, key: str) -> float | None:
        """Check an optional finite number >= 0 (bools are not numbers here)."""
        if value is None:
            return None
        message = (
            "must be a number >= 0 (the relative difference allowed between replicas' "
            "numbers), or left out for exact equality"
        )
        if isinstance(value, str) and _looks_numeric(value):
            # YAML 1.1 reads 1e-6 as text: only 1.0e-6 (with a point) is a number.
            raise self.fail(
                key, f"{message}; {value!r} is text to YAML: write it with a decimal point"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, message)
        number = float(value)
        if not (math.isfinite(number) and number >= 0):
            raise self.fail(key, message)
        return number

    def name(self, value: object, key: str) -> str:
        """Check a project name against NAME_PATTERN."""
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise self.fail(
                key, "must be 1-64 characters of a-z, 0-9, '_' or '-', starting with a-z or 0-9"
            )
        return value

    def entrypoint(self, value: object, key: str) -> tuple[str, ...]:
        """Check a non-empty list (at most MAX_ENTRYPOINT_ITEMS) of non-empty strings."""
        if not isinstance(value, list) or not value:
            raise self.fail(key, "must be a non-empty list of strings")
        if len(value) > MAX_ENTRYPOINT_ITEMS:
            raise self.fail(key, f"at most {MAX_ENTRYPOINT_ITEMS} items")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(f"{key}[{index}]", "must be a non-empty string")
            if "\0" in item:
                # exec() cannot take NUL in an argument; better to say so at pack time.
                raise self.fail(f"{key}[{index}]", "must not contain NUL")
        return tuple(value)

    def mode(self, value: object, key: str) -> ExecutionMode:
        """Check the execution mode is one of EXECUTION_MODES."""
        for mode in EXECUTION_MODES:
            if value == mode:
                return mode
        raise self.fail(key, f"must be one of: {', '.join(EXECUTION_MODES)}")

    def limits(self, value: object, key: str, required: tuple[str, ...]) -> Limits:
        """Check the limits mapping; keys not in ``required`` fall back to Limits defaults."""
        raw = self.mapping(value, key, _LIMIT_KEYS, required)
        defaults = Limits()
        wall = raw.get("wall_seconds", defaults.wall_seconds)
        memory = raw.get("memory_mb", defaults.memory_mb)
        output = raw.get("output_mb", defaults.output_mb)
        return Limits(
            wall_seconds=self.positive_number(wall, f"{key}.wall_seconds"),
            memory_mb=self.integer(memory, f"{key}.memory_mb", 1, "must be a positive integer"),
            output_mb=self.integer(output, f"{key}.output_mb", 1, "must be a positive integer"),
        )

    def spec(self, raw: dict[str, object], limits_required: tuple[str, ...]) -> ProjectSpec:
        """Build a ProjectSpec from an already key-checked top-level mapping."""
        return ProjectSpec(
            name=self.name(raw["name"], "name"),
            version=self.integer(raw["version"], "version", 1, "must be an integer >= 1"),
            entrypoint=self.entrypoint(raw["entrypoint"], "entrypoint"),
            mode=self.mode(raw.get("mode", "process"), "mode"),
            limits=self.limits(raw.get("limits", {}), "limits", limits_required),
            quorum=self.integer(raw.get("quorum", 1), "quorum", 1, "must be an integer >= 1"),
            tolerance=self.tolerance(raw.get("tolerance"), "tolerance"),
        )


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_project_yaml(path: Path) -> ProjectSpec:
    """Read and validate a project's project.yaml.

    Raises:
        BundleError: unreadable, not YAML, not a mapping, an unknown or missing key, or a
            bad value; the message names the file and the key path.
    """
    checker = _Checker(str(path))
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PROJECT_YAML_BYTES + 1)
    except OSError as exc:
        raise checker.fail("", f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_PROJECT_YAML_BYTES:
        raise checker.fail("", f"larger than {MAX_PROJECT_YAML_BYTES} bytes")
    try:
        document = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise checker.fail("", f"not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise checker.fail("", "not valid YAML: nested too deeply") from None
    if document is None:
        raise checker.fail("", "empty file")
    raw = checker.mapping(document, "", _PROJECT_KEYS, _REQUIRED_PROJECT_KEYS)
    return checker.spec(raw, limits_required=())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Describe a YAML error with its line number where PyYAML knows it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}: {problem}"
    return str(problem)


def manifest_to_bytes(m: Manifest) -> bytes:
    """Serialise ``m`` as canonical JSON: sorted keys, no whitespace, UTF-8.

    The bytes are what gets signed, so the same Manifest always gives the same bytes.
    ``files`` keeps the order of ``m.files`` (pack sorts them by path).
    """
    document = {
        "format": MANIFEST_FORMAT,
        "name": m.name,
        "version": m.version,
        "entrypoint": list(m.entrypoint),
        "mode": m.mode,
        "limits": {
            "wall_seconds": float(m.limits.wall_seconds),
            "memory_mb": m.limits.memory_mb,
            "output_mb": m.limits.output_mb,
        },
        "quorum": m.quorum,
        "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256, "executable": f.executable}
            for f in m.files
        ],
        "owner_key": m.owner_key,
    }
    if m.tolerance is not None:
        document["tolerance"] = float(m.tolerance)
    if m.endorsements:
        document["endorsements"] = [endorsement_to_json(e) for e in m.endorsements]
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def manifest_from_bytes(b: bytes) -> Manifest:
    """Parse and strictly validate manifest.json bytes.

    Raises:
        BundleError: not UTF-8 JSON, duplicate JSON keys, NaN/Infinity, an unknown or
            missing key, a bad value, an unsafe or duplicate file path, or a bad owner key.
    """
    checker = _Checker("manifest.json")
    document = _load_strict_json(b, checker)
    raw = checker.mapping(document, "", _MANIFEST_KEYS, _REQUIRED_MANIFEST_KEYS)
    if isinstance(raw["format"], bool) or raw["format"] != MANIFEST_FORMAT:
        raise checker.fail("format", f"unsupported manifest format {raw['format']!r}")
    spec = checker.spec(raw, limits_required=_LIMIT_KEYS)
    files = _check_files(raw["files"], checker)
    owner_key = _check_owner_key(raw["owner_key"], checker)
    endorsements = check_endorsements(raw["endorsements"], checker) if "endorsements" in raw else ()
    return spec.to_manifest(files, owner_key, endorsements)


def _load_strict_json(b: bytes, checker: _Checker) -> object:
    """Decode JSON refusing duplicate keys and non-finite numbers.

    Raises:
        BundleError: anything that is not strict UTF-8 JSON.
    """

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                # Two parsers could pick different values for a repeated key; refuse it.
                raise checker.fail(key, "duplicate key")
            result[key] = value
        return result

    def no_constants(name: str) -> object:
        raise checker.fail("", f"{name} is not allowed")

    try:
        return json.loads(
            b.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants
        )
    except UnicodeDecodeError:
        raise checker.fail("", "not valid UTF-8") from None
    except RecursionError:
        raise checker.fail("", "nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and over-long integer literals
        raise checker.fail("", f"not valid JSON: {exc}") from None


def _check_files(value: object, checker: _Checker) -> tuple[FileEntry, ...]:
    """Validate the manifest's file list.

    Raises:
        BundleError: a bad entry, an unsafe or duplicate path, or a path that is both a
            file and the directory of another file.
    """
    if not isinstance(value, list):
        raise checker.fail("files", "must be a list")
    entries = tuple(_check_file_entry(item, f"files[{i}]", checker) for i, item in enumerate(value))
    paths: set[str] = set()
    directories: set[str] = set()
    for entry in entries:
        if entry.path in paths:
            raise checker.fail("files", f"duplicate path {entry.path!r}")
        paths.add(entry.path)
        parts = entry.path.split("/")
        directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = sorted(paths & directories)
    if clash:
        raise checker.fail("files", f"{clash[0]!r} is both a file and a directory")
    return entries


def _check_file_entry(value: object, key: str, checker: _Checker) -> FileEntry:
    """Validate one ``{path, size, sha256, executable}`` object."""
    raw = checker.mapping(value, key, _FILE_KEYS, _FILE_KEYS)
    path = raw["path"]
    if not isinstance(path, str):
        raise checker.fail(f"{key}.path", "must be a string")
    reason = unsafe_path_reason(path)
    if reason is not None:
        raise checker.fail(f"{key}.path", f"unsafe path {path!r}: {reason}")
    size = raw["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise checker.fail(f"{key}.size", "must be an integer >= 0")
    digest = raw["sha256"]
    if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
        raise checker.fail(f"{key}.sha256", "must be 64 lowercase hex digits")
    executable = raw["executable"]
    if not isinstance(executable, bool):
        raise checker.fail(f"{key}.executable", "must be true or false")
    return FileEntry(path=path, size=size, sha256=digest, executable=executable)


def _check_owner_key(value: object, checker: _Checker, key: str = "owner_key") -> str:
    """Check owner_key is a well-formed canonical public key string."""
    if not isinstance(value, str):
        raise checker.fail(key, "must be a string")
    try:
        parse_public_key(value)
    except KeyFormatError as exc:
        raise checker.fail(key, str(exc)) from None
    if value != value.strip():
        raise checker.fail(key, "must not have surrounding whitespace")
    return value


def endorsement_to_json(e: Endorsement) -> dict[str, str]:
    """The JSON object of one endorsement (in manifest.json and in a chain file)."""
    return {
        "project": e.project,
        "old_key": e.old_key,
        "new_key": e.new_key,
        "signature": base64.b64encode(e.signature).decode("ascii"),
    }


def check_endorsements(value: object, checker: _Checker) -> tuple[Endorsement, ...]:
    """Validate the form of an endorsement list (the signatures are issc.rotation's job).

    Raises:
        BundleError: not a non-empty list of at most MAX_ENDORSEMENTS well-formed objects.
    """
    key = "endorsements"
    if not isinstance(value, list) or not value:
        raise checker.fail(key, "must be a non-empty list")
    if len(value) > MAX_ENDORSEMENTS:
        raise checker.fail(key, f"at most {MAX_ENDORSEMENTS} key rotations")
    out = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        raw = checker.mapping(item, where, _ENDORSEMENT_KEYS, _ENDORSEMENT_KEYS)
        project = checker.name(raw["project"], f"{where}.project")
        old_key = _check_owner_key(raw["old_key"], checker, f"{where}.old_key")
        new_key = _check_owner_key(raw["new_key"], checker, f"{where}.new_key")
        signature = raw["signature"]
        if not isinstance(signature, str):
            raise checker.fail(f"{where}.signature", "must be a base64 string")
        try:
            sig = base64.b64decode(signature.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise checker.fail(f"{where}.signature", "bad base64") from None
        if len(sig) != ENDORSEMENT_SIGNATURE_BYTES or base64.b64encode(sig).decode() != signature:
            raise checker.fail(
                f"{where}.signature",
                f"must be {ENDORSEMENT_SIGNATURE_BYTES} bytes, canonical base64",
            )
        out.append(Endorsement(project=project, old_key=old_key, new_key=new_key, signature=sig))
    return tuple(out)


def checker_for(source: str) -> _Checker:
    """A validator whose errors name ``source`` (a file), for formats built on these rules."""
    return _Checker(source)
