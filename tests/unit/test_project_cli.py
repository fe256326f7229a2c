"""``issc-project``: keygen, pack, verify and submit, through main() and once as a real process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from issc.bundle import bundle_digest
from issc.errors import IsscError
from issc.project_cli import drop_into_inbox, main

PROJECT_YAML = "name: primes\nversion: 3\nentrypoint: [python3, main.py]\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    src = tmp_path / "primes"
    src.mkdir()
    (src / "project.yaml").write_text(PROJECT_YAML)
    (src / "main.py").write_text("print(42)\n")
    return src


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def _keygen(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    key_file = tmp_path / name
    assert main(["keygen", "--out", str(key_file)]) == 0
    out = capsys.readouterr().out
    return key_file, out.strip()


def test_keygen_prints_one_line_with_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "owner.key"
    assert main(["keygen", "--out", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"ed25519:[A-Za-z0-9+/]{43}=\n", out)
    assert (tmp_path / "owner.key.pub").read_text() == out
    assert key_file.exists()


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file, _ = _keygen(tmp_path, "owner.key", capsys)
    before = key_file.read_bytes()
    assert main(["keygen", "--out", str(key_file)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("issc-project: keygen: ")
    assert "already exists" in captured.err
    assert key_file.read_bytes() == before


def test_pack_then_verify(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file, public = _keygen(tmp_path, "owner.key", capsys)
    bundle = tmp_path / "primes.issc"
    assert main(["pack", str(project), "--key", str(key_file), "--out", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert out == f"packed primes version 3 -> {bundle} (sha256 {bundle_digest(bundle)})\n"

    for pubkey in (public, f"{key_file}.pub"):
        assert main(["verify", str(bundle), "--pubkey", pubkey]) == 0
        assert capsys.readouterr().out == "OK: primes version 3, 2 files\n"


def test_verify_with_the_wrong_key_fails_with_the_reason(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file, _ = _keygen(tmp_path, "owner.key", capsys)
    _, stranger = _keygen(tmp_path, "stranger.key", capsys)
    bundle = tmp_path / "primes.issc"
    main(["pack", str(project), "--key", str(key_file), "--out", str(bundle)])
    capsys.readouterr()

    assert main(["verify", str(bundle), "--pubkey", stranger]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"issc-project: verify: {bundle}: ")
    assert "signature does not verify with the trusted key" in captured.err


def test_verify_with_a_malformed_key_or_bundle_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "junk.issc"
    bundle.write_bytes(b"junk")
    _, public = _keygen(tmp_path, "owner.key", capsys)

    assert main(["verify", str(bundle), "--pubkey", "ed25519:AAAA"]) == 1
    assert "issc-project: verify: public key" in capsys.readouterr().err
    assert main(["verify", str(bundle), "--pubkey", public]) == 1
    assert "not a valid bundle archive" in capsys.readouterr().err


def test_pack_reports_project_yaml_errors(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file, _ = _keygen(tmp_path, "owner.key", capsys)
    (project / "project.yaml").write_text(PROJECT_YAML + "mode: batch\n")
    out = tmp_path / "primes.issc"
    assert main(["pack", str(project), "--key", str(key_file), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("issc-project: pack: ")
    assert "project.yaml: mode: must be one of" in err
    assert not out.exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["keygen"], ["pack", "dir", "--key", "k"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "usage: issc-project" in capsys.readouterr().err


def test_console_script_runs_as_a_real_process(tmp_path: Path, project: Path) -> None:
    script = Path(sys.executable).parent / "issc-project"
    assert script.exists(), "run `pip install -e .` in the venv"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, timeout=60, check=False
        )

    key_file = tmp_path / "owner.key"
    keygen = run("keygen", "--out", str(key_file))
    assert keygen.returncode == 0, keygen.stderr
    public = keygen.stdout.strip()
    bundle = tmp_path / "primes.issc"
    pack = run("pack", str(project), "--key", str(key_file), "--out", str(bundle))
    assert pack.returncode == 0, pack.stderr
    assert pack.stdout.startswith("packed primes version 3 -> ")
    verify = run("verify", str(bundle), "--pubkey", public)
    assert (verify.returncode, verify.stdout) == (0, "OK: primes version 3, 2 files\n")

    stranger = run("keygen", "--out", str(tmp_path / "stranger.key")).stdout.strip()
    refused = run("verify", str(bundle), "--pubkey", stranger)
    assert refused.returncode == 1
    assert refused.stderr.startswith("issc-project: verify: ")
    assert refused.stdout == ""


# --- submit ----------------------------------------------------------------------------------


def _files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_submit_copies_each_file_under_its_name_and_leaves_no_temp_files(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "primes.issc"
    bundle.write_bytes(b"bundle bytes")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("project: primes\ntasks: []\n")

    assert main(["submit", str(bundle), str(tasks), "--inbox", str(inbox)]) == 0
    assert capsys.readouterr().out == (
        f"submitted {bundle} -> {inbox / 'primes.issc'}\n"
        f"submitted {tasks} -> {inbox / 'tasks.yaml'}\n"
    )
    assert _files_in(inbox) == ["primes.issc", "tasks.yaml"]
    assert (inbox / "primes.issc").read_bytes() == b"bundle bytes"
    assert (inbox / "tasks.yaml").read_text() == tasks.read_text()
    assert bundle.exists()  # a copy, not a move


def test_submit_writes_a_hidden_complete_temp_file_first(
    tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hub ignores names starting with "."; the real name must appear only once the
    # data is complete, in a single step.
    seen: list[tuple[str, bytes, bool]] = []
    real_link = os.link

    def spy_link(src: str | Path, dst: str | Path) -> None:
        seen.append((Path(src).name, Path(src).read_bytes(), Path(dst).exists()))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", spy_link)
    source = tmp_path / "tasks.jsonl"
    source.write_bytes(b'{"project": "primes", "id": "1", "input": 1}\n' * 1000)
    drop_into_inbox(source, inbox)

    [(temp_name, data_at_publish, target_existed)] = seen
    assert temp_name.startswith(".tasks.jsonl.")
    assert temp_name.endswith(".tmp")
    assert data_at_publish == source.read_bytes()
    assert not target_existed
    assert _files_in(inbox) == ["tasks.jsonl"]


def test_submit_refuses_a_name_already_in_the_inbox(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (inbox / "tasks.yaml").write_text("not yet ingested")
    first = tmp_path / "first.yaml"
    first.write_text("project: primes\ntasks: []\n")
    again = tmp_path / "tasks.yaml"
    again.write_text("project: primes\ntasks: []\n")

    assert main(["submit", str(first), str(again), "--inbox", str(inbox)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("issc-project: submit: ")
    assert f"{inbox / 'tasks.yaml'}: already in the inbox" in err
    assert (inbox / "tasks.yaml").read_text() == "not yet ingested"
    assert _files_in(inbox) == ["tasks.yaml"]  # checked before anything was copied


def test_drop_never_replaces_a_file_that_appeared_meanwhile(tmp_path: Path, inbox: Path) -> None:
    # The up-front check can race with another submitter; the publish step itself must
    # refuse rather than replace.
    (inbox / "tasks.yaml").write_text("theirs")
    source = tmp_path / "tasks.yaml"
    source.write_text("mine")
    with pytest.raises(IsscError, match="already in the inbox"):
        drop_into_inbox(source, inbox)
    assert (inbox / "tasks.yaml").read_text() == "theirs"
    assert _files_in(inbox) == ["tasks.yaml"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (".hidden.yaml", "ignores names starting with '.'"),
        ("tasks.yaml.part", "ignores names starting with '.' or ending in .part"),
        ("notes.txt", "not a bundle or task file"),
    ],
)
def test_submit_refuses_names_the_hub_would_not_ingest(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str], name: str, reason: str
) -> None:
    source = tmp_path / name
    source.write_text("x")
    assert main(["submit", str(source), "--inbox", str(inbox)]) == 1
    assert reason in capsys.readouterr().err
    assert _files_in(inbox) == []


def test_submit_refuses_a_missing_file_or_inbox(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", str(tmp_path / "gone.yaml"), "--inbox", str(inbox)]) == 1
    assert "gone.yaml: not a regular file" in capsys.readouterr().err
    source = tmp_path / "tasks.yaml"
    source.write_text("x")
    assert main(["submit", str(source), "--inbox", str(tmp_path / "nope")]) == 1
    assert "nope: not a directory" in capsys.readouterr().err


def test_submit_refuses_two_files_with_the_same_name(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "tasks.yaml").write_text(sub)
    argv = [str(tmp_path / "a" / "tasks.yaml"), str(tmp_path / "b" / "tasks.yaml")]
    assert main(["submit", *argv, "--inbox", str(inbox)]) == 1
    assert "another file named tasks.yaml" in capsys.readouterr().err
    assert _files_in(inbox) == []
