"""``issc-project``: keygen, pack, verify and submit, through main() and once as a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from issc import project_cli
from issc.bundle import bundle_digest
from issc.errors import IsscError
from issc.project_cli import copy_input_file, drop_into_inbox, main

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
    real_rename = project_cli.rename_no_replace

    def spy_rename(src: Path, dst: Path) -> bool:
        seen.append((src.name, src.read_bytes(), dst.exists()))
        return real_rename(src, dst)

    monkeypatch.setattr(project_cli, "rename_no_replace", spy_rename)
    source = tmp_path / "tasks.jsonl"
    source.write_bytes(b'{"project": "primes", "id": "1", "input": 1}\n' * 1000)
    drop_into_inbox(source, inbox)

    [(temp_name, data_at_publish, target_existed)] = seen
    assert temp_name.startswith(".tasks.jsonl.")
    assert temp_name.endswith(".tmp")
    assert data_at_publish == source.read_bytes()
    assert not target_existed
    assert _files_in(inbox) == ["tasks.jsonl"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "hard-link"])
def test_submit_never_replaces_a_file_not_yet_ingested(
    tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool
) -> None:
    # renameat2(RENAME_NOREPLACE) where the system has it, else a hard link: both refuse.
    if not renameat2:
        monkeypatch.setattr(project_cli, "rename_no_replace", lambda src, dst: False)
    (inbox / "tasks.yaml").write_text("not yet ingested")
    source = tmp_path / "tasks.yaml"
    source.write_text("project: primes\ntasks: []\n")
    with pytest.raises(IsscError, match="already in the inbox"):
        drop_into_inbox(source, inbox)
    assert (inbox / "tasks.yaml").read_text() == "not yet ingested"
    assert _files_in(inbox) == ["tasks.yaml"]  # no temp file left
    (inbox / "tasks.yaml").unlink()
    drop_into_inbox(source, inbox)
    assert (inbox / "tasks.yaml").read_text() == source.read_text()


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


# --- submit: input files ---------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` by relative path, hidden ones included."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _owner(tmp_path: Path) -> Path:
    """An owner's work directory: two texts and a shared stopwords file."""
    owner = tmp_path / "owner"
    (owner / "texts").mkdir(parents=True)
    (owner / "texts" / "a.txt").write_text("alpha alpha\n")
    (owner / "texts" / "b.txt").write_text("beta\n")
    (owner / "stop.txt").write_text("the\n")
    return owner


def _task(task_id: str, **files: Any) -> dict[str, Any]:
    return {"id": task_id, "input": {"n": 1}, "files": files}


def _task_file(path: Path, tasks: list[dict[str, Any]]) -> Path:
    """YAML (one task a line, from line 3 on) or JSONL (one task a line, from line 1 on)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"project": "wf", **t}) + "\n" for t in tasks))
    else:
        path.write_text("project: wf\ntasks:\n" + "".join(f"  - {json.dumps(t)}\n" for t in tasks))
    return path


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch, inbox: Path) -> list[str]:
    """The files that submit publishes in the inbox (paths relative to it), in order."""
    order: list[str] = []
    real = project_cli._publish

    def spy(source: Path, target: Path) -> None:
        real(source, target)
        order.append(target.relative_to(inbox).as_posix())

    monkeypatch.setattr(project_cli, "_publish", spy)
    return order


@pytest.mark.parametrize("task_name", ["tasks.yaml", "tasks.jsonl"])
def test_submit_carries_input_files_before_the_task_file(
    tmp_path: Path,
    inbox: Path,
    capsys: pytest.CaptureFixture[str],
    published: list[str],
    task_name: str,
) -> None:
    owner = _owner(tmp_path)
    tasks = _task_file(
        owner / task_name,
        [
            _task("a", text="texts/a.txt", stopwords="stop.txt"),
            _task("b", text="./texts//b.txt", stopwords="stop.txt"),  # normalised
            _task("c", again="texts/a.txt"),  # the same path under another name
        ],
    )
    assert main(["submit", str(tasks), "--inbox", str(inbox)]) == 0

    assert _tree(inbox) == {
        "texts/a.txt": b"alpha alpha\n",
        "stop.txt": b"the\n",
        "texts/b.txt": b"beta\n",
        task_name: tasks.read_bytes(),
    }
    # Each distinct file once, in the order the tasks name them; the task file last.
    assert published == ["texts/a.txt", "stop.txt", "texts/b.txt", task_name]
    assert capsys.readouterr().out == (
        f"submitted {owner / 'texts/a.txt'} -> {inbox / 'texts/a.txt'}\n"
        f"submitted {owner / 'stop.txt'} -> {inbox / 'stop.txt'}\n"
        f"submitted {owner / 'texts/b.txt'} -> {inbox / 'texts/b.txt'}\n"
        f"submitted {tasks} -> {inbox / task_name}\n"
    )


def test_submit_copies_a_file_shared_by_two_task_files_once(
    tmp_path: Path, inbox: Path, published: list[str]
) -> None:
    owner = _owner(tmp_path)
    first = _task_file(owner / "one.yaml", [_task("a", text="texts/a.txt", stopwords="stop.txt")])
    second = _task_file(owner / "two.jsonl", [_task("b", text="texts/b.txt", stopwords="stop.txt")])
    assert main(["submit", str(first), str(second), "--inbox", str(inbox)]) == 0
    assert published == ["texts/a.txt", "stop.txt", "one.yaml", "texts/b.txt", "two.jsonl"]


def test_submit_leaves_an_identical_input_file_alone(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = _owner(tmp_path)
    tasks = _task_file(owner / "tasks.yaml", [_task("a", text="texts/a.txt", stopwords="stop.txt")])
    (inbox / "texts").mkdir()
    (inbox / "texts" / "a.txt").write_text("alpha alpha\n")
    before = (inbox / "texts" / "a.txt").stat()

    assert main(["submit", str(tasks), "--inbox", str(inbox)]) == 0
    after = (inbox / "texts" / "a.txt").stat()
    # Not rewritten (same inode), but its mtime is fresh, so the hub keeps it for the
    # task file that follows (hub/inbox.py RETIRE_GRACE).
    assert after.st_ino == before.st_ino
    assert after.st_mtime_ns >= before.st_mtime_ns
    out = capsys.readouterr().out
    assert f"{inbox / 'texts/a.txt'}: already in the inbox with the same content, left alone" in out
    assert sorted(_tree(inbox)) == ["stop.txt", "tasks.yaml", "texts/a.txt"]


def test_submit_refuses_different_content_already_in_the_inbox(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = _owner(tmp_path)
    tasks = _task_file(owner / "tasks.yaml", [_task("a", stopwords="stop.txt", text="texts/a.txt")])
    (inbox / "texts").mkdir()
    (inbox / "texts" / "a.txt").write_text("someone else's text\n")

    assert main(["submit", str(tasks), "--inbox", str(inbox)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"issc-project: submit: {tasks}: line 3: input file text: texts/a.txt: ")
    assert f"{inbox / 'texts/a.txt'} is already in the inbox with different content" in err
    # Checked before anything was copied: not even stop.txt, named first, is there.
    assert _tree(inbox) == {"texts/a.txt": b"someone else's text\n"}


def test_submit_refuses_two_different_files_for_one_place(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = _owner(tmp_path)
    other = tmp_path / "other"
    (other / "texts").mkdir(parents=True)
    (other / "texts" / "a.txt").write_text("another alpha\n")
    first = _task_file(owner / "one.yaml", [_task("a", text="texts/a.txt")])
    second = _task_file(other / "two.jsonl", [_task("b", text="texts/a.txt")])

    assert main(["submit", str(first), str(second), "--inbox", str(inbox)]) == 1
    err = capsys.readouterr().err
    assert f"{second}: line 1: input file text: texts/a.txt: " in err
    assert f"differs from {owner / 'texts/a.txt'} ({first}: line 3)" in err
    assert _tree(inbox) == {}


def _symlinked(owner: Path) -> str:
    (owner / "link.txt").symlink_to(owner / "texts" / "a.txt")
    return "link.txt"


def _through_symlinked_dir(owner: Path) -> str:
    (owner / "alias").symlink_to(owner / "texts", target_is_directory=True)
    return "alias/a.txt"


def _a_directory(owner: Path) -> str:
    return "texts"


@pytest.mark.parametrize(
    ("name", "make_path", "reason"),
    [
        ("text", lambda owner: "texts/gone.txt", "texts/gone.txt: no such file"),
        ("text", lambda owner: "../outside.txt", "../outside.txt: climbs out of the task file's"),
        ("text", lambda owner: "texts/../stop.txt", "texts/../stop.txt: climbs out"),
        ("text", lambda owner: str(owner / "stop.txt"), "stop.txt: an absolute path"),
        ("text", _symlinked, "link.txt is a symlink"),
        ("text", _through_symlinked_dir, "alias is a symlink"),
        ("text", _a_directory, "texts: not a regular file"),
        ("text", lambda owner: "", "the path must be a string, got ''"),
        ("text", lambda owner: 7, "the path must be a string, got 7"),
        ("text", lambda owner: "more.yaml", "the hub would take it for a bundle or task file"),
        ("text", lambda owner: "accepted/a.txt", "the hub's own inbox/accepted/ directory"),
        ("text", lambda owner: "rejected", "the hub's own inbox/rejected/ directory"),
        ("text", lambda owner: "texts\\a.txt", "'texts\\\\a.txt': a path separates its parts"),
        ("text", lambda owner: "a" * 1025, "the path is over 1024 characters"),
        (".hidden", lambda owner: "stop.txt", "input file name '.hidden' must be"),
        ("in/text", lambda owner: "stop.txt", "input file name 'in/text' must be"),
        ("x" * 129, lambda owner: "stop.txt", "must be 1-128 letters"),
        ("a b", lambda owner: "stop.txt", "input file name 'a b' must be"),
    ],
)
def test_submit_refuses_a_bad_input_file_reference_and_copies_nothing(
    tmp_path: Path,
    inbox: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    make_path: Callable[[Path], Any],
    reason: str,
) -> None:
    owner = _owner(tmp_path)
    (tmp_path / "outside.txt").write_text("outside\n")
    (owner / "more.yaml").write_text("project: wf\ntasks: []\n")
    good = _task_file(owner / "good.yaml", [_task("a", text="texts/a.txt")])
    bad = _task_file(
        owner / "bad.jsonl",
        [_task("ok", stopwords="stop.txt"), _task("bad", **{name: make_path(owner)})],
    )
    assert main(["submit", str(good), str(bad), "--inbox", str(inbox)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"issc-project: submit: {bad}: line 2: "), err
    assert reason in err
    assert _tree(inbox) == {}


def test_submit_names_the_line_of_a_task_file_that_does_not_parse(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = _owner(tmp_path)
    good = _task_file(owner / "good.yaml", [_task("a", text="texts/a.txt")])
    yaml_file = owner / "broken.yaml"
    yaml_file.write_text("project: wf\ntasks:\n  - {id: a, input: [1, 2}\n")
    assert main(["submit", str(good), str(yaml_file), "--inbox", str(inbox)]) == 1
    assert f"{yaml_file}: line 3: not valid YAML" in capsys.readouterr().err

    jsonl_file = owner / "broken.jsonl"
    jsonl_file.write_text('{"project": "wf", "id": "a", "input": 1}\n\n{"project": \n')
    assert main(["submit", str(good), str(jsonl_file), "--inbox", str(inbox)]) == 1
    assert f"{jsonl_file}: line 3: not valid JSON" in capsys.readouterr().err

    not_a_map = _task_file(owner / "list.yaml", [{"id": "a", "input": 1, "files": ["stop.txt"]}])
    assert main(["submit", str(not_a_map), "--inbox", str(inbox)]) == 1
    assert f"{not_a_map}: line 3: task 'a': files must be a mapping" in capsys.readouterr().err

    binary = owner / "latin1.jsonl"
    binary.write_bytes(b'{"project": "wf", "id": "caf\xe9", "input": 1}\n')
    assert main(["submit", str(binary), "--inbox", str(inbox)]) == 1
    assert f"{binary}: not UTF-8 text (byte 28)" in capsys.readouterr().err
    assert _tree(inbox) == {}


def test_submit_refuses_more_than_64_input_files_for_a_task(
    tmp_path: Path, inbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = _owner(tmp_path)
    tasks = _task_file(owner / "t.yaml", [_task("a", **{f"f{k}": "stop.txt" for k in range(65)})])
    assert main(["submit", str(tasks), "--inbox", str(inbox)]) == 1
    assert "line 3: task 'a': 65 input files, over the limit of 64" in capsys.readouterr().err


def test_submit_leaves_other_task_file_shapes_to_the_hub(
    tmp_path: Path, inbox: Path, published: list[str]
) -> None:
    # Not a mapping, no tasks list, a task that is not a mapping, a bundle: no input files
    # to find; the hub rejects what it cannot use, with its own reason.
    odd = [
        ("scalar.yaml", "just words\n"),
        ("notasks.yml", "project: wf\n"),
        ("listy.jsonl", '[1, 2]\n{"project": "wf", "id": "a", "input": 1}\n'),
        ("b.issc", "\x00\x01 not yaml: ["),
    ]
    for name, text in odd:
        (tmp_path / name).write_text(text)
    argv = [str(tmp_path / name) for name, _ in odd]
    assert main(["submit", *argv, "--inbox", str(inbox)]) == 0
    assert published == [name for name, _ in odd]


def test_copy_input_file_uses_a_hidden_temp_name_beside_the_target(
    tmp_path: Path, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Path, bytes]] = []
    real_rename = project_cli.rename_no_replace

    def spy_rename(src: Path, dst: Path) -> bool:
        seen.append((src, src.read_bytes()))
        return real_rename(src, dst)

    monkeypatch.setattr(project_cli, "rename_no_replace", spy_rename)
    source = tmp_path / "data.bin"
    source.write_bytes(b"\x00data" * 1000)
    target = inbox / "deep" / "er" / "data.bin"
    assert copy_input_file(source, target) is True

    [(temp, data_at_publish)] = seen
    assert temp.parent == target.parent
    assert temp.name.startswith(".data.bin.") and temp.name.endswith(".tmp")
    assert data_at_publish == source.read_bytes()
    assert _tree(inbox) == {"deep/er/data.bin": source.read_bytes()}


def test_copy_input_file_when_the_target_appeared_meanwhile(tmp_path: Path, inbox: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(b"mine")
    target = inbox / "data.bin"
    target.write_bytes(b"mine")
    assert copy_input_file(source, target) is False  # identical: left alone
    target.write_bytes(b"theirs")
    with pytest.raises(IsscError, match="already in the inbox with different content"):
        copy_input_file(source, target)
    assert target.read_bytes() == b"theirs"
    assert _tree(inbox) == {"data.bin": b"theirs"}
