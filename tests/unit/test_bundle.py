"""Signed project bundles: project.yaml, the manifest, pack, verify, extract.

Hostile archives are built byte by byte (``_archive``) so that a test can lie about
sizes, types and names in ways tarfile's writer would not allow.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from issc import bundle
from issc.bundle import (
    bundle_digest,
    extract_bundle,
    pack_bundle,
    read_manifest,
    sign_manifest,
    verify_bundle,
    verify_self_signed,
)
from issc.errors import BundleError
from issc.keys import generate_key, load_private_key, public_key_string
from issc.manifest import (
    FileEntry,
    Limits,
    Manifest,
    manifest_from_bytes,
    manifest_to_bytes,
    parse_project_yaml,
)

PROJECT_YAML = """\
name: primes
version: 3
entrypoint: [python3, main.py]
limits: {wall_seconds: 30, memory_mb: 256}
"""
Member = tuple[tarfile.TarInfo, bytes]


# --- fixtures and archive helpers ------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "owner.key"
    path.parent.mkdir()
    generate_key(path)
    return path


@pytest.fixture
def key(key_file: Path) -> Ed25519PrivateKey:
    return load_private_key(key_file)


@pytest.fixture
def trusted(key: Ed25519PrivateKey) -> Ed25519PublicKey:
    return key.public_key()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    src = tmp_path / "primes"
    (src / "lib").mkdir(parents=True)
    (src / "bin").mkdir()
    (src / "project.yaml").write_text(PROJECT_YAML)
    (src / "main.py").write_text("import sys\nprint(sys.stdin.read())\n")
    (src / "lib" / "util.py").write_text("def f():\n    return 1\n")
    (src / "bin" / "run.sh").write_text("#!/bin/sh\nexec python3 main.py\n")
    (src / "bin" / "run.sh").chmod(0o755)
    (src / "data.bin").write_bytes(bytes(range(256)) * 4)
    # Sorts before "lib/util.py" as a path ("-" < "/") but after "lib" as a directory entry.
    (src / "lib-extra.txt").write_text("extra\n")
    # Things that must stay out of the bundle:
    (src / ".hidden").write_text("secret")
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0pyc")
    (src / "lib" / "stale.pyc").write_bytes(b"\0pyc")
    return src


PACKED_PATHS = ["bin/run.sh", "data.bin", "lib-extra.txt", "lib/util.py", "main.py", "project.yaml"]


@pytest.fixture
def packed(tmp_path: Path, project: Path, key_file: Path) -> Path:
    out = tmp_path / "primes.issc"
    pack_bundle(project, key_file, out)
    return out


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info, data


def _read_members(path: Path) -> list[Member]:
    with tarfile.open(path, "r:gz") as tar:
        members = []
        for info in tar.getmembers():
            stream = tar.extractfile(info)
            members.append((info, stream.read() if stream else b""))
        return members


def _archive(members: list[Member]) -> bytes:
    """A gzip'd tar with headers exactly as given: ``info.size`` may lie about ``data``."""
    raw = io.BytesIO()
    for info, data in members:
        raw.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        raw.write(data + b"\0" * (-len(data) % 512))
    raw.write(b"\0" * 1024)
    return gzip.compress(raw.getvalue(), mtime=0)


def _rewrite(path: Path, change: Callable[[list[Member]], list[Member]]) -> Path:
    out = path.with_name("changed.issc")
    out.write_bytes(_archive(change(_read_members(path))))
    return out


def _replace_data(members: list[Member], name: str, data: bytes) -> list[Member]:
    result = []
    for info, old in members:
        if info.name == name:
            info.size = len(data)
            old = data
        result.append((info, old))
    return result


def _signed_archive(
    manifest: Manifest, signer: Ed25519PrivateKey, files: dict[str, bytes]
) -> bytes:
    manifest_bytes = manifest_to_bytes(manifest)
    members = [
        _member("manifest.json", manifest_bytes),
        _member("signature", sign_manifest(manifest_bytes, signer)),
    ]
    members += [_member("files/" + path, data) for path, data in files.items()]
    return _archive(members)


def _manifest_for(files: dict[str, bytes], owner: Ed25519PrivateKey) -> Manifest:
    entries = tuple(
        FileEntry(path, len(data), hashlib.sha256(data).hexdigest())
        for path, data in sorted(files.items())
    )
    return Manifest(
        name="demo",
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=1,
        files=entries,
        owner_key=public_key_string(owner.public_key()),
    )


# --- project.yaml ----------------------------------------------------------------------------


def test_project_yaml_defaults(tmp_path: Path) -> None:
    path = tmp_path / "project.yaml"
    path.write_text("name: p\nversion: 1\nentrypoint: [./run]\n")
    spec = parse_project_yaml(path)
    assert spec.mode == "process"
    assert spec.limits == Limits()
    assert spec.quorum == 1
    assert spec.entrypoint == ("./run",)


def test_project_yaml_full(tmp_path: Path) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(
        "name: my_proj-2\nversion: 7\nentrypoint: [python3, -u, w.py]\nmode: persistent\n"
        "limits: {wall_seconds: 1.5, memory_mb: 64, output_mb: 2}\nquorum: 3\n"
    )
    spec = parse_project_yaml(path)
    assert (spec.name, spec.version, spec.mode, spec.quorum) == ("my_proj-2", 7, "persistent", 3)
    assert spec.limits == Limits(wall_seconds=1.5, memory_mb=64, output_mb=2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cpu: 2", "cpu: unknown key"),
        ("limits: {gpu: 1}", "limits.gpu: unknown key"),
        ("limits: {memory_mb: 1.5}", "limits.memory_mb: must be a positive integer"),
        ("limits: {memory_mb: 0}", "limits.memory_mb: must be a positive integer"),
        ("limits: {output_mb: true}", "limits.output_mb: must be a positive integer"),
        ("limits: {wall_seconds: -1}", "limits.wall_seconds: must be a positive number"),
        ("limits: {wall_seconds: .inf}", "limits.wall_seconds: must be a positive number"),
        ("limits: [1, 2]", "limits: must be a mapping"),
        ("mode: batch", "mode: must be one of: process, persistent"),
        ("quorum: 0", "quorum: must be an integer >= 1"),
    ],
)
def test_project_yaml_errors_name_file_and_key(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(PROJECT_YAML.replace("limits: {wall_seconds: 30, memory_mb: 256}\n", "") + line)
    with pytest.raises(BundleError, match=f"project.yaml: {message}"):
        parse_project_yaml(path)


@pytest.mark.parametrize(
    ("replacement", "message"),
    [
        ("version: '3'", "version: must be an integer >= 1"),
        ("version: 0", "version: must be an integer >= 1"),
        ("version: true", "version: must be an integer >= 1"),
        ("version: 3.0", "version: must be an integer >= 1"),
        ("version: 99999999999", "version: must be at most"),
        ("name: Primes", "name: must be 1-64 characters"),
        ('name: "primes\\n"', "name: must be 1-64 characters"),
        ("name: -x", "name: must be 1-64 characters"),
        ("name: " + "a" * 65, "name: must be 1-64 characters"),
    ],
)
def test_project_yaml_bad_name_or_version(tmp_path: Path, replacement: str, message: str) -> None:
    path = tmp_path / "project.yaml"
    key = replacement.split(":")[0]
    original = next(ln for ln in PROJECT_YAML.splitlines() if ln.startswith(key + ":"))
    path.write_text(PROJECT_YAML.replace(original, replacement))
    with pytest.raises(BundleError, match=f"project.yaml: {message}"):
        parse_project_yaml(path)


@pytest.mark.parametrize(
    ("entrypoint", "message"),
    [
        ("[]", r"entrypoint: must be a non-empty list"),
        ("python3 main.py", r"entrypoint: must be a non-empty list"),
        ("[python3, '']", r"entrypoint\[1\]: must be a non-empty string"),
        ("[python3, 3]", r"entrypoint\[1\]: must be a non-empty string"),
        ("[" + ", ".join(["x"] * 65) + "]", r"entrypoint: at most 64 items"),
    ],
)
def test_project_yaml_bad_entrypoint(tmp_path: Path, entrypoint: str, message: str) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(PROJECT_YAML.replace("[python3, main.py]", entrypoint))
    with pytest.raises(BundleError, match=f"project.yaml: {message}"):
        parse_project_yaml(path)


def test_project_yaml_missing_key_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "project.yaml"
    path.write_text("version: 1\nentrypoint: [x]\n")
    with pytest.raises(BundleError, match=r"project\.yaml: name: required"):
        parse_project_yaml(path)
    path.write_text("name: p\nversion: [1\n")
    with pytest.raises(BundleError, match=r"project.yaml: not valid YAML: line \d+"):
        parse_project_yaml(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(BundleError, match=r"project\.yaml: must be a mapping"):
        parse_project_yaml(path)


# --- manifest.json ---------------------------------------------------------------------------


def test_manifest_bytes_are_canonical_and_round_trip(key: Ed25519PrivateKey) -> None:
    manifest = _manifest_for({"b.py": b"b", "a.py": b"a"}, key)
    data = manifest_to_bytes(manifest)
    document = json.loads(data)
    assert data == json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert manifest_from_bytes(data) == manifest


def _manifest_json(key: Ed25519PrivateKey, **changes: object) -> bytes:
    document = json.loads(manifest_to_bytes(_manifest_for({"a.py": b"a"}, key)))
    for dotted, value in changes.items():
        target = document
        *parents, last = dotted.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return json.dumps(document).encode()


def _file(path: str, size: int = 1, sha: str = "0" * 64, executable: bool = False) -> object:
    return {"path": path, "size": size, "sha256": sha, "executable": executable}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"files__0__path": "/etc/passwd"}, r"files\[0\]\.path: unsafe path .*absolute"),
        ({"files__0__path": "a/../../x"}, r"files\[0\]\.path: unsafe path .*'\.\.'"),
        ({"files__0__path": "a//b"}, r"files\[0\]\.path: unsafe path .*empty component"),
        ({"files__0__path": "a\\b"}, r"files\[0\]\.path: unsafe path .*backslash"),
        ({"files__0__path": "a\0b"}, r"files\[0\]\.path: unsafe path .*NUL"),
        ({"files__0__path": "a\nb"}, r"files\[0\]\.path: unsafe path .*control"),
        ({"files__0__path": "a" * 256}, r"files\[0\]\.path: unsafe path .*longer than 255"),
        ({"files__0__path": ""}, r"files\[0\]\.path: unsafe path .*empty path"),
        ({"files__0__sha256": "A" * 64}, r"files\[0\]\.sha256: must be 64 lowercase hex"),
        ({"files__0__sha256": "0" * 63}, r"files\[0\]\.sha256: must be 64 lowercase hex"),
        ({"files__0__size": -1}, r"files\[0\]\.size: must be an integer >= 0"),
        ({"files__0__size": True}, r"files\[0\]\.size: must be an integer >= 0"),
        ({"files__0__executable": 1}, r"files\[0\]\.executable: must be true or false"),
        ({"files__0__mtime": 0}, r"files\[0\]\.mtime: unknown key"),
        ({"files": [_file("a"), _file("a")]}, r"files: duplicate path 'a'"),
        ({"files": [_file("a"), _file("a/b")]}, r"files: 'a' is both a file and a directory"),
        ({"files": {}}, r"files: must be a list"),
        ({"extra": 1}, r"extra: unknown key"),
        ({"format": 2}, r"format: unsupported manifest format 2"),
        ({"limits": {"wall_seconds": 1.0}}, r"limits\.memory_mb: required"),
        ({"owner_key": "ed25519:AAAA"}, r"owner_key: .*must be 32 bytes"),
        ({"version": 0}, r"version: must be an integer >= 1"),
        ({"mode": "Process"}, r"mode: must be one of"),
    ],
)
def test_manifest_from_bytes_is_strict(
    key: Ed25519PrivateKey, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(BundleError, match=f"manifest.json: {message}"):
        manifest_from_bytes(_manifest_json(key, **changes))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"name": "a", "name": "b"}', "name: duplicate key"),
        (b'{"x": NaN}', "NaN is not allowed"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply|not valid JSON"),
        (b"[]", "must be a mapping"),
    ],
)
def test_manifest_from_bytes_refuses_bad_json(data: bytes, message: str) -> None:
    with pytest.raises(BundleError, match=f"manifest.json: .*({message})"):
        manifest_from_bytes(data)


# --- pack --------------------------------------------------------------------------------------


def test_pack_verify_extract_round_trip(
    tmp_path: Path, project: Path, packed: Path, key: Ed25519PrivateKey, trusted: Ed25519PublicKey
) -> None:
    manifest = verify_bundle(packed, trusted)
    assert [f.path for f in manifest.files] == PACKED_PATHS
    assert (manifest.name, manifest.version, manifest.entrypoint) == (
        "primes",
        3,
        ("python3", "main.py"),
    )
    assert manifest.limits == Limits(wall_seconds=30.0, memory_mb=256, output_mb=64)
    assert manifest.owner_key == public_key_string(key.public_key())
    assert {f.path for f in manifest.files if f.executable} == {"bin/run.sh"}
    assert read_manifest(packed) == manifest
    assert verify_self_signed(packed) == manifest

    dest = tmp_path / "cache" / "primes-3"
    dest.parent.mkdir()
    assert extract_bundle(packed, trusted, dest) == manifest
    for path in PACKED_PATHS:
        assert (dest / path).read_bytes() == (project / path).read_bytes()
    extracted = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert extracted == PACKED_PATHS
    assert stat.S_IMODE((dest / "main.py").stat().st_mode) == 0o444
    assert stat.S_IMODE((dest / "bin" / "run.sh").stat().st_mode) == 0o555
    assert stat.S_IMODE((dest / "lib").stat().st_mode) == 0o755
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert os.listdir(dest.parent) == ["primes-3"]  # no staging directory left behind


def test_archive_layout_is_manifest_signature_then_sorted_files(packed: Path) -> None:
    members = _read_members(packed)
    assert [info.name for info, _ in members] == ["manifest.json", "signature"] + [
        "files/" + p for p in PACKED_PATHS
    ]
    for info, _ in members:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
        assert info.mode in (0o644, 0o755)


def test_pack_is_deterministic(tmp_path: Path, project: Path, key_file: Path) -> None:
    first, second = tmp_path / "one.issc", tmp_path / "two.issc"
    pack_bundle(project, key_file, first)
    os.utime(project / "main.py", (1_000_000, 1_000_000))  # file times must not leak in
    pack_bundle(project, key_file, second)
    assert first.read_bytes() == second.read_bytes()
    assert bundle_digest(first) == hashlib.sha256(first.read_bytes()).hexdigest()


def test_pack_overwrites_output_atomically_and_skips_it_inside_project(
    project: Path, key_file: Path
) -> None:
    out = project / "primes.issc"
    pack_bundle(project, key_file, out)
    manifest = pack_bundle(project, key_file, out)  # the first bundle is not packed in
    assert [f.path for f in manifest.files] == PACKED_PATHS
    assert [p.name for p in project.iterdir() if p.name.endswith(".tmp")] == []


def test_pack_refuses_symlinks(project: Path, key_file: Path, tmp_path: Path) -> None:
    (project / "lib" / "link.py").symlink_to(project / "main.py")
    with pytest.raises(BundleError, match=r"lib/link\.py: symbolic links cannot be packed"):
        pack_bundle(project, key_file, tmp_path / "out.issc")
    assert not (tmp_path / "out.issc").exists()


def test_pack_refuses_special_files(project: Path, key_file: Path, tmp_path: Path) -> None:
    os.mkfifo(project / "pipe")
    with pytest.raises(BundleError, match=r"pipe: not a regular file"):
        pack_bundle(project, key_file, tmp_path / "out.issc")


def test_pack_refuses_to_publish_the_private_key(project: Path, tmp_path: Path) -> None:
    inside = project / "owner.key"
    generate_key(inside)
    with pytest.raises(BundleError, match=r"owner\.key: the private key lies inside"):
        pack_bundle(project, inside, tmp_path / "out.issc")


def test_pack_reports_project_yaml_errors(project: Path, key_file: Path, tmp_path: Path) -> None:
    (project / "project.yaml").write_text(PROJECT_YAML + "quorum: many\n")
    with pytest.raises(BundleError, match=r"project\.yaml: quorum: must be an integer"):
        pack_bundle(project, key_file, tmp_path / "out.issc")


def test_pack_refuses_too_many_files(
    project: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle, "MAX_FILES", 3)
    with pytest.raises(BundleError, match="more than 3 files"):
        pack_bundle(project, key_file, tmp_path / "out.issc")


# --- verify: signatures and keys -------------------------------------------------------------


def test_signed_by_another_key_is_refused(packed: Path) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(BundleError, match="signature does not verify with the trusted key"):
        verify_bundle(packed, stranger)


def test_manifest_modified_after_signing_is_refused(
    packed: Path, trusted: Ed25519PublicKey
) -> None:
    def bump_version(members: list[Member]) -> list[Member]:
        data = members[0][1].replace(b'"version":3', b'"version":4')
        assert data != members[0][1]
        return _replace_data(members, "manifest.json", data)

    changed = _rewrite(packed, bump_version)
    assert read_manifest(changed).version == 4  # still a well-formed manifest
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(changed, trusted)
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_self_signed(changed)


def test_signature_without_domain_prefix_is_refused(
    packed: Path, key: Ed25519PrivateKey, trusted: Ed25519PublicKey
) -> None:
    def plain_signature(members: list[Member]) -> list[Member]:
        return _replace_data(members, "signature", key.sign(members[0][1]))

    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(_rewrite(packed, plain_signature), trusted)


def test_owner_key_must_be_the_trusted_key(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    files = {"a.py": b"print(1)\n"}
    # Signed by `other`, but the manifest names `key` as its owner.
    path = tmp_path / "claims.issc"
    path.write_bytes(_signed_archive(_manifest_for(files, key), other, files))
    with pytest.raises(BundleError, match=r"owner_key \S+ is not the trusted key"):
        verify_bundle(path, other.public_key())
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_self_signed(path)


def test_self_signed_accepts_any_consistent_signer(tmp_path: Path) -> None:
    signer = Ed25519PrivateKey.generate()
    files = {"a.py": b"print(1)\n"}
    path = tmp_path / "self.issc"
    path.write_bytes(_signed_archive(_manifest_for(files, signer), signer, files))
    assert verify_self_signed(path).owner_key == public_key_string(signer.public_key())


def test_short_signature_is_refused(packed: Path, trusted: Ed25519PublicKey) -> None:
    changed = _rewrite(packed, lambda ms: _replace_data(ms, "signature", b"\0" * 10))
    with pytest.raises(BundleError, match="signature: must be 64 bytes"):
        verify_bundle(changed, trusted)


# --- verify: file content and members --------------------------------------------------------


def test_tampered_file_content_is_refused_naming_the_file(
    packed: Path, trusted: Ed25519PublicKey
) -> None:
    def flip_one_byte(members: list[Member]) -> list[Member]:
        data = bytearray(dict((i.name, d) for i, d in members)["files/main.py"])
        data[3] ^= 0x01
        return _replace_data(members, "files/main.py", bytes(data))

    with pytest.raises(BundleError, match=r"file main\.py: SHA-256 mismatch"):
        verify_bundle(_rewrite(packed, flip_one_byte), trusted)


def test_file_size_differing_from_manifest_is_refused(
    packed: Path, trusted: Ed25519PublicKey
) -> None:
    changed = _rewrite(packed, lambda ms: _replace_data(ms, "files/main.py", b"x"))
    with pytest.raises(BundleError, match=r"file main\.py: size mismatch"):
        verify_bundle(changed, trusted)


def test_extra_member_is_refused(packed: Path, trusted: Ed25519PublicKey) -> None:
    changed = _rewrite(packed, lambda ms: [*ms, _member("files/evil.py", b"import os\n")])
    with pytest.raises(BundleError, match=r"unexpected member files/evil\.py"):
        verify_bundle(changed, trusted)


def test_missing_member_is_refused(packed: Path, trusted: Ed25519PublicKey) -> None:
    changed = _rewrite(packed, lambda ms: [m for m in ms if m[0].name != "files/main.py"])
    with pytest.raises(BundleError, match=r"missing member files/main\.py"):
        verify_bundle(changed, trusted)


def test_duplicate_member_is_refused(packed: Path, trusted: Ed25519PublicKey) -> None:
    changed = _rewrite(packed, lambda ms: [*ms, next(m for m in ms if m[0].name.endswith("n.py"))])
    with pytest.raises(BundleError, match=r"duplicate member files/main\.py"):
        verify_bundle(changed, trusted)


def test_manifest_must_come_first(packed: Path, trusted: Ed25519PublicKey) -> None:
    changed = _rewrite(packed, lambda ms: [ms[1], ms[0], *ms[2:]])
    with pytest.raises(BundleError, match=r"expected member manifest\.json, found signature"):
        read_manifest(changed)


@pytest.mark.parametrize(
    "name", ["../x", "files/../../x", "/etc/cron.d/evil", "files//x", "files/a\\b"]
)
def test_unsafe_member_names_are_refused(
    packed: Path, trusted: Ed25519PublicKey, name: str
) -> None:
    changed = _rewrite(packed, lambda ms: [*ms[:2], _member(name, b"x"), *ms[2:]])
    with pytest.raises(BundleError, match=r"member .*: unsafe path"):
        verify_bundle(changed, trusted)


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]
)
def test_non_regular_members_are_refused(
    packed: Path, trusted: Ed25519PublicKey, kind: bytes
) -> None:
    changed = _rewrite(packed, lambda ms: [*ms[:2], _member("files/link", kind=kind), *ms[2:]])
    with pytest.raises(BundleError, match="member files/link: not a regular file"):
        verify_bundle(changed, trusted)


def test_symlink_named_like_a_manifest_file_is_refused(
    packed: Path, trusted: Ed25519PublicKey
) -> None:
    def swap(members: list[Member]) -> list[Member]:
        return [
            _member(i.name, kind=tarfile.SYMTYPE) if i.name == "files/main.py" else (i, d)
            for i, d in members
        ]

    with pytest.raises(BundleError, match=r"member files/main\.py: not a regular file"):
        verify_bundle(_rewrite(packed, swap), trusted)


# --- verify: bounds --------------------------------------------------------------------------


def test_manifest_claiming_too_many_bytes_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    manifest = _manifest_for({"a.py": b"x"}, key)
    huge = dataclasses.replace(manifest.files[0], size=bundle.MAX_TOTAL_BYTES + 1)
    manifest = dataclasses.replace(manifest, files=(huge,))
    path = tmp_path / "huge.issc"
    path.write_bytes(_signed_archive(manifest, key, {}))  # the data is not even there
    with pytest.raises(BundleError, match="bytes of files, over"):
        verify_bundle(path, key.public_key())
    with pytest.raises(BundleError, match="bytes of files, over"):
        read_manifest(path)


def test_manifest_claiming_too_many_files_is_refused(
    packed: Path, trusted: Ed25519PublicKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle, "MAX_FILES", 5)
    with pytest.raises(BundleError, match="declares 6 files, over 5"):
        verify_bundle(packed, trusted)


def test_member_header_claiming_more_than_manifest_is_refused_before_reading(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    files = {"a.py": b"x"}
    manifest_bytes = manifest_to_bytes(_manifest_for(files, key))
    liar, _ = _member("files/a.py")
    liar.size = 1 << 33  # 8 GiB claimed; the archive ends right after the header
    path = tmp_path / "liar.issc"
    path.write_bytes(
        _archive(
            [
                _member("manifest.json", manifest_bytes),
                _member("signature", sign_manifest(manifest_bytes, key)),
                (liar, b""),
            ]
        )
    )
    with pytest.raises(BundleError, match=r"file a\.py: size mismatch"):
        verify_bundle(path, key.public_key())


def test_oversized_manifest_member_is_refused_before_reading(tmp_path: Path) -> None:
    info, _ = _member("manifest.json")
    info.size = bundle.MAX_MANIFEST_BYTES + 1
    path = tmp_path / "big.issc"
    path.write_bytes(_archive([(info, b"")]))
    with pytest.raises(BundleError, match=r"member manifest\.json: \d+ bytes, over the limit"):
        read_manifest(path)


def test_huge_pax_header_is_refused_before_reading(tmp_path: Path) -> None:
    info, _ = _member("././@PaxHeader", kind=tarfile.XHDTYPE)
    info.size = 1 << 30  # the data is not there: refusing must not need to read it
    path = tmp_path / "pax.issc"
    path.write_bytes(_archive([(info, b"")]))
    with pytest.raises(BundleError, match="PAX header of 1073741824 bytes, over the limit"):
        read_manifest(path)


def test_pathological_pax_header_is_refused_quickly(tmp_path: Path) -> None:
    # CVE-2024-6232: tarfile's PAX parser takes quadratic time on a run of digits. Ours
    # rejects the record after reading at most 21 characters of it.
    digits = b"9" * 8000
    info, _ = _member("././@PaxHeader", kind=tarfile.XHDTYPE)
    info.size = len(digits)
    path = tmp_path / "digits.issc"
    path.write_bytes(_archive([(info, digits), _member("manifest.json", b"{}")]))
    with pytest.raises(BundleError, match="not a valid bundle archive: bad PAX record length"):
        read_manifest(path)


def _pax_member(records: bytes, then: Member) -> list[Member]:
    info, _ = _member("././@PaxHeader", kind=tarfile.XHDTYPE)
    info.size = len(records)
    return [(info, records), then]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (b"20 linkpath=/etc/pw\n", "unsupported PAX record b'linkpath'"),
        (b"11 path=ab\n11 path=cd\n", "repeated PAX record b'path'"),
        (b"99 path=x\n", "bad PAX record"),
        (b"5 =x\n", "bad PAX record"),
        (b"x path=a\n", "bad PAX record length"),
    ],
)
def test_bad_pax_records_are_refused(tmp_path: Path, records: bytes, message: str) -> None:
    path = tmp_path / "pax.issc"
    path.write_bytes(_archive(_pax_member(records, _member("manifest.json", b"{}"))))
    with pytest.raises(BundleError, match=f"not a valid bundle archive: {re.escape(message)}"):
        read_manifest(path)


def test_pax_path_record_renames_the_next_member(packed: Path, trusted: Ed25519PublicKey) -> None:
    # A PAX "path" can turn a harmless-looking header into a traversal; it is checked too.
    def sneak(members: list[Member]) -> list[Member]:
        return [*members[:2], *_pax_member(b"16 path=../../x\n", _member("files/ok")), *members[2:]]

    with pytest.raises(BundleError, match=r"member \.\./\.\./x: unsafe path"):
        verify_bundle(_rewrite(packed, sneak), trusted)


def test_chained_extended_headers_are_refused(tmp_path: Path) -> None:
    first, _ = _member("././@PaxHeader", kind=tarfile.XHDTYPE)
    records = b"11 path=ab\n"
    first.size = len(records)
    members = [(first, records), *_pax_member(records, _member("manifest.json", b"{}"))]
    path = tmp_path / "chain.issc"
    path.write_bytes(_archive(members))
    with pytest.raises(BundleError, match="must be followed by a member header"):
        read_manifest(path)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_gnu_long_names_and_global_headers_are_refused(tmp_path: Path, kind: bytes) -> None:
    info, _ = _member("././@LongLink", kind=kind)
    info.size = 10
    path = tmp_path / "gnu.issc"
    path.write_bytes(_archive([(info, b"x" * 10), _member("manifest.json", b"{}")]))
    with pytest.raises(BundleError, match="unsupported tar header type"):
        read_manifest(path)


def test_bad_header_checksum_is_refused(packed: Path) -> None:
    raw = bytearray(gzip.decompress(packed.read_bytes()))
    raw[5] ^= 0x20  # inside the first header's name field
    broken = packed.with_name("broken.issc")
    broken.write_bytes(gzip.compress(bytes(raw), mtime=0))
    with pytest.raises(BundleError, match="not a valid bundle archive: bad tar header checksum"):
        read_manifest(broken)


def test_data_after_the_end_marker_is_refused(packed: Path, trusted: Ed25519PublicKey) -> None:
    raw = gzip.decompress(packed.read_bytes()) + b"junk" + bytes(508)
    padded = packed.with_name("padded.issc")
    padded.write_bytes(gzip.compress(raw, mtime=0))
    with pytest.raises(BundleError, match="data after the end of the archive"):
        verify_bundle(padded, trusted)


def test_trailing_data_beyond_the_bound_is_refused(packed: Path, trusted: Ed25519PublicKey) -> None:
    # A gzip bomb after the archive: decompression must stop at the bound.
    raw = gzip.decompress(packed.read_bytes()) + b"\0" * (16 * 1024 * 1024)
    padded = packed.with_name("padded.issc")
    padded.write_bytes(gzip.compress(raw, mtime=0))
    with pytest.raises(BundleError, match="archive holds more data than its manifest allows"):
        verify_bundle(padded, trusted)


def test_long_and_non_ascii_paths_round_trip(
    tmp_path: Path, project: Path, key_file: Path, trusted: Ed25519PublicKey
) -> None:
    # These need PAX "path" records: a name over 100 bytes, and non-ASCII characters.
    deep = project / ("d" * 120) / ("f" * 120)
    deep.mkdir(parents=True)
    (deep / "x.py").write_text("long")
    (project / "caf\u00e9-\u6570\u636e.txt").write_text("unicode")
    out = tmp_path / "long.issc"
    manifest = pack_bundle(project, key_file, out)
    long_path = f"{'d' * 120}/{'f' * 120}/x.py"
    assert long_path in {f.path for f in manifest.files}
    dest = tmp_path / "dest"
    extract_bundle(out, trusted, dest)
    assert (dest / long_path).read_text() == "long"
    assert (dest / "caf\u00e9-\u6570\u636e.txt").read_text() == "unicode"


# --- verify: corrupt archives ----------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, -1])
def test_truncated_archive_is_refused(packed: Path, trusted: Ed25519PublicKey, keep: float) -> None:
    data = packed.read_bytes()
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    truncated = packed.with_name("truncated.issc")
    truncated.write_bytes(data[:cut])
    with pytest.raises(BundleError, match=r"truncated\.issc: not a valid bundle archive"):
        verify_bundle(truncated, trusted)


@pytest.mark.parametrize(
    "data", [b"garbage" * 100, gzip.compress(b"not a tar archive" * 100), os.urandom(4096)]
)
def test_garbage_is_refused(tmp_path: Path, trusted: Ed25519PublicKey, data: bytes) -> None:
    path = tmp_path / "garbage.issc"
    path.write_bytes(data)
    with pytest.raises(BundleError, match=r"garbage\.issc: not a valid bundle archive"):
        verify_bundle(path, trusted)
    with pytest.raises(BundleError, match=r"garbage\.issc: not a valid bundle archive"):
        read_manifest(path)


def test_missing_bundle_file_is_named(tmp_path: Path, trusted: Ed25519PublicKey) -> None:
    with pytest.raises(BundleError, match=r"nope\.issc: cannot read"):
        verify_bundle(tmp_path / "nope.issc", trusted)
    with pytest.raises(BundleError, match=r"nope\.issc: cannot read"):
        bundle_digest(tmp_path / "nope.issc")


# --- extract ---------------------------------------------------------------------------------


def test_extract_refuses_an_existing_destination(
    tmp_path: Path, packed: Path, trusted: Ed25519PublicKey
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleError, match="destination already exists"):
        extract_bundle(packed, trusted, dest)
    assert list(dest.iterdir()) == []


def test_failed_extract_leaves_nothing_behind(
    tmp_path: Path, packed: Path, trusted: Ed25519PublicKey
) -> None:
    def tamper_last_file(members: list[Member]) -> list[Member]:
        # Earlier files verify and get written before the bad one is found.
        return _replace_data(members, "files/project.yaml", PROJECT_YAML.upper().encode())

    changed = _rewrite(packed, tamper_last_file)
    area = tmp_path / "cache"
    area.mkdir()
    with pytest.raises(BundleError, match=r"file project\.yaml: SHA-256 mismatch"):
        extract_bundle(changed, trusted, area / "primes")
    assert list(area.iterdir()) == []


def test_extract_never_writes_outside_dest(
    tmp_path: Path, packed: Path, trusted: Ed25519PublicKey
) -> None:
    changed = _rewrite(packed, lambda ms: [*ms[:2], _member("files/../../escape", b"x"), *ms[2:]])
    area = tmp_path / "cache"
    area.mkdir()
    with pytest.raises(BundleError, match="unsafe path"):
        extract_bundle(changed, trusted, area / "primes")
    assert list(area.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_extract_refuses_a_bundle_signed_by_another_key(tmp_path: Path, packed: Path) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(BundleError, match="signature does not verify"):
        extract_bundle(packed, stranger, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
