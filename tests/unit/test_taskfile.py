"""Task files from the inbox: YAML and JSONL parse to the same entries, and every bad
file is refused whole with a TaskFileError that names the problem and its line.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from hub import taskfile
from hub.blobs import ContentStore
from hub.inbox import Inbox
from hub.store import Store, TaskEntry
from hub.taskfile import parse_task_file
from issc.errors import TaskFileError


def yaml_file(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").encode()


def jsonl_file(*lines: object) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def refused(name: str, data: bytes) -> TaskFileError:
    with pytest.raises(TaskFileError) as caught:
        parse_task_file(name, data)
    return caught.value


# ---- good files ---------------------------------------------------------------------------


def test_yaml_parses_to_compact_json_inputs_with_lines() -> None:
    data = yaml_file(
        """
        project: primes
        tasks:
          - id: r-1
            input: {from: 1, to: 1000}
          - {id: r-2, input: [1, 2.5, "x", null, true]}

          - id: r_3.x
            input: "just text ü"
        """
    )
    parsed = parse_task_file("batch.yaml", data)
    assert parsed.project == "primes"
    assert parsed.entries == [
        TaskEntry("r-1", '{"from":1,"to":1000}', 3),
        TaskEntry("r-2", '[1,2.5,"x",null,true]', 5),
        TaskEntry("r_3.x", '"just text \\u00fc"', 7),
    ]
    assert parse_task_file("batch.yml", data) == parsed


def test_jsonl_parses_to_the_same_entries_with_lines() -> None:
    data = jsonl_file(
        {"project": "primes", "id": "r-1", "input": {"from": 1, "to": 1000}},
        "",
        "   ",
        {"project": "primes", "id": "r-2", "input": None},
    )
    parsed = parse_task_file("batch.jsonl", data)
    assert parsed.project == "primes"
    assert parsed.entries == [
        TaskEntry("r-1", '{"from":1,"to":1000}', 1),
        TaskEntry("r-2", "null", 4),
    ]


def test_a_yaml_alias_may_share_an_input() -> None:
    data = yaml_file(
        """
        project: primes
        tasks:
          - {id: a, input: &common {limit: 10}}
          - {id: b, input: *common}
        """
    )
    assert [e.input_json for e in parse_task_file("t.yaml", data).entries] == [
        '{"limit":10}',
        '{"limit":10}',
    ]


def test_inputs_up_to_the_limit_are_fine() -> None:
    text = "x" * (taskfile.MAX_INPUT_BYTES - 2)  # the quotes make it exactly the limit
    for name, data in [
        ("t.jsonl", jsonl_file({"project": "p", "id": "a", "input": text})),
        ("t.yaml", yaml_file(f"project: p\ntasks:\n  - id: a\n    input: {text}\n")),
    ]:
        (entry,) = parse_task_file(name, data).entries
        assert len(entry.input_json) == taskfile.MAX_INPUT_BYTES


# ---- bad files: each names its line --------------------------------------------------------


def test_bad_yaml_names_its_line() -> None:
    error = refused(
        "t.yaml",
        yaml_file(
            """
            project: primes
            tasks:
              - id: a
                input: 1
              - id: b: c
                input: 2
            """
        ),
    )
    assert error.line == 5
    assert str(error).startswith("line 5: not valid YAML")


def test_bad_json_names_its_line() -> None:
    error = refused(
        "t.jsonl",
        jsonl_file(
            {"project": "p", "id": "a", "input": 1},
            {"project": "p", "id": "b", "input": 2},
            '{"project": "p", "id": "c", "input": }',
        ),
    )
    assert error.line == 3
    assert "not valid JSON" in str(error)


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("t.jsonl", jsonl_file({"project": "p", "id": "a", "input": 1}, {"project": "p"}), 2),
        ("t.yaml", yaml_file("project: p\ntasks:\n  - id: a\n    input: 1\n  - input: 2\n"), 5),
    ],
)
def test_a_missing_id(name: str, data: bytes, line: int) -> None:
    error = refused(name, data)
    assert error.line == line
    assert "task id None must be a string" in str(error)


@pytest.mark.parametrize(
    "bad_id", ["a/b", "../etc", ".hidden", "-flag", "", "x" * 129, "with space", 17, ["a"]]
)
def test_a_bad_id(bad_id: object) -> None:
    error = refused("t.jsonl", jsonl_file({"project": "p", "id": bad_id, "input": 1}))
    assert error.line == 1
    assert f"task id {bad_id!r} must be a string of 1-128 letters" in str(error)


def test_a_task_without_input() -> None:
    error = refused("t.yaml", yaml_file("project: p\ntasks:\n  - id: a\n"))
    assert (error.line, "task 'a' has no input" in str(error)) == (3, True)


@pytest.mark.parametrize("name", ["t.jsonl", "t.yaml"])
def test_a_duplicate_id_in_the_file(name: str) -> None:
    if name.endswith(".jsonl"):
        data = jsonl_file(*({"project": "p", "id": i, "input": 0} for i in ["a", "b", "a"]))
    else:
        data = yaml_file("project: p\ntasks:\n  - {id: a, input: 0}\n  - {id: b, input: 0}\n"
                         "  - {id: a, input: 0}\n")  # fmt: skip
    error = refused(name, data)
    assert "duplicate task id 'a' in this file" in str(error)
    assert error.line == 3 if name.endswith(".jsonl") else 5


def test_an_unknown_key_in_a_task() -> None:
    error = refused("t.jsonl", jsonl_file({"project": "p", "id": "a", "input": 1, "prio": 3}))
    assert (error.line, "unknown key 'prio' in task" in str(error)) == (1, True)
    error = refused("t.yaml", yaml_file("project: p\ntasks:\n  - {id: a, input: 1, prio: 3}\n"))
    assert error.line == 3
    assert "unknown key 'prio'" in str(error)


def test_an_unknown_top_level_key() -> None:
    error = refused("t.yaml", yaml_file("project: p\npriority: 3\ntasks:\n  - {id: a, input: 1}\n"))
    assert (error.line, "unknown top-level key 'priority'" in str(error)) == (2, True)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_jsonl(constant: str) -> None:
    error = refused(
        "t.jsonl",
        jsonl_file(
            {"project": "p", "id": "a", "input": 1},
            f'{{"project": "p", "id": "b", "input": [1, {constant}]}}',
        ),
    )
    assert error.line == 2
    assert f"{constant} is not allowed" in str(error)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_in_yaml(value: str) -> None:
    error = refused("t.yaml", yaml_file(f"project: p\ntasks:\n  - id: a\n    input: [{value}]\n"))
    assert error.line == 3
    assert "input is not JSON-serialisable" in str(error)


@pytest.mark.parametrize(
    "value",
    ["2024-01-01", "!!binary aGVsbG8=", "!!set {a, b}"],
)
def test_yaml_values_json_cannot_hold(value: str) -> None:
    error = refused("t.yaml", yaml_file(f"project: p\ntasks:\n  - id: a\n    input: {value}\n"))
    assert (error.line, "not JSON-serialisable" in str(error)) == (3, True)


def test_the_project_must_be_the_same_on_every_line() -> None:
    error = refused(
        "t.jsonl",
        jsonl_file(
            {"project": "primes", "id": "a", "input": 1},
            {"project": "mandel", "id": "b", "input": 1},
        ),
    )
    assert error.line == 2
    assert "project 'mandel' differs from 'primes' on earlier lines" in str(error)


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("t.jsonl", jsonl_file({"id": "a", "input": 1}), 1),
        ("t.jsonl", jsonl_file({"project": "Has Caps", "id": "a", "input": 1}), 1),
        ("t.yaml", yaml_file("project: ../x\ntasks:\n  - {id: a, input: 1}\n"), 1),
        ("t.yaml", yaml_file("tasks:\n  - {id: a, input: 1}\n"), None),
    ],
)
def test_a_bad_or_missing_project(name: str, data: bytes, line: int | None) -> None:
    error = refused(name, data)
    assert error.line == line
    assert "project must be a project name" in str(error)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("t.jsonl", b"", "the file holds no tasks"),
        ("t.jsonl", b"\n  \n", "the file holds no tasks"),
        ("t.yaml", b"", "a task file must be a mapping"),
        ("t.yaml", b"project: p\ntasks: []\n", "the file holds no tasks"),
        ("t.yaml", b"project: p\n", "tasks must be a list"),
        ("t.yaml", b"- a\n- b\n", "a task file must be a mapping"),
        ("t.jsonl", b"[1, 2]\n", "each line must be a JSON object"),
        ("t.yaml", b"project: p\ntasks:\n  - just a string\n", "a task must be a mapping"),
    ],
)
def test_empty_or_shapeless_files(name: str, data: bytes, message: str) -> None:
    assert message in str(refused(name, data))


@pytest.mark.parametrize("name", ["t.jsonl", "t.yaml"])
def test_a_file_that_is_not_utf8(name: str) -> None:
    data = b'{"project": "p", "id": "a", "input": "caf\xe9"}\n'
    if name.endswith(".yaml"):
        data = b"project: p\ntasks:\n  - {id: a, input: caf\xe9}\n"
    error = refused(name, data)
    assert "not UTF-8 text (byte" in str(error)


def test_an_input_over_the_limit() -> None:
    text = "x" * taskfile.MAX_INPUT_BYTES
    error = refused("t.jsonl", jsonl_file({"project": "p", "id": "big", "input": text}))
    assert error.line == 1
    assert f"over the {taskfile.MAX_INPUT_BYTES} limit" in str(error)


def test_too_many_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(taskfile, "MAX_TASKS_PER_FILE", 3)
    lines = [{"project": "p", "id": f"t{i}", "input": i} for i in range(4)]
    error = refused("t.jsonl", jsonl_file(*lines))
    assert (error.line, "more than 3 tasks" in str(error)) == (4, True)
    yaml_tasks = "".join(f"  - {{id: t{i}, input: {i}}}\n" for i in range(4))
    assert "more than 3 tasks" in str(
        refused("t.yaml", f"project: p\ntasks:\n{yaml_tasks}".encode())
    )


# ---- hostile files: refused quickly, never with a foreign exception -----------------------


@pytest.mark.parametrize(
    ("value", "line", "message"),
    [
        ("1" * 5000, 4, "bad int value"),  # past Python's int-from-string digit limit
        ("2024-13-45", 4, "bad timestamp value"),  # looks like a date, is none
        ("!!float abc", 4, "bad float value"),
        ("!!int abc", 4, "bad int value"),
    ],
)
def test_yaml_values_that_cannot_be_built(value: str, line: int, message: str) -> None:
    error = refused("t.yaml", f"project: p\ntasks:\n  - id: a\n    input: {value}\n".encode())
    assert error.line == line
    assert message in str(error)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("t.yaml", b"project: p\ntasks:\n  - id: a\n    input: " + b"[" * 1_200 + b"]" * 1_200),
        ("t.jsonl", b'{"project":"p","id":"a","input":' + b"[" * 3_000 + b"]" * 3_000 + b"}"),
    ],
)
def test_nesting_too_deep(name: str, data: bytes) -> None:
    assert "nested too deeply" in str(refused(name, data))


def test_a_billion_laughs_is_refused_before_it_is_expanded() -> None:
    lines = ["project: p", "tasks:", "  - id: a", "    input:", "      - &l0 [1,1,1,1,1,1,1,1,1,1]"]
    for i in range(1, 9):  # 10**9 ones in a 700-byte file
        lines.append(f"      - &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    started = time.monotonic()
    error = refused("t.yaml", ("\n".join(lines) + "\n").encode())
    assert time.monotonic() - started < 5
    assert error.line == 3
    assert "expands to more than" in str(error)


def test_aliases_cannot_make_a_file_bigger_than_the_biggest_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(taskfile, "MAX_EXPANDED_BYTES", 10_000)
    big = "x" * 3_000
    tasks = [f"  - {{id: t0, input: &b {big}}}"] + [
        f"  - {{id: t{i}, input: *b}}" for i in range(1, 5)
    ]
    error = refused("t.yaml", ("project: p\ntasks:\n" + "\n".join(tasks) + "\n").encode())
    assert error.line == 6  # the fourth copy passes 10,000 bytes
    assert "the tasks expand to more than 10000 bytes" in str(error)


def test_a_recursive_alias() -> None:
    error = refused("t.yaml", b"project: p\ntasks:\n  - id: a\n    input: &x [1, *x]\n")
    assert "refers to itself" in str(error)


def test_a_hostile_file_in_the_inbox_is_rejected_not_raised(tmp_path: Path) -> None:
    """The inbox catches only IsscError: anything else would stop it on every restart."""
    store = Store(f"sqlite:///{tmp_path}/hub.db")
    store.create_schema()
    try:
        inbox = Inbox(tmp_path / "inbox", store, ContentStore(tmp_path / "files"), settle=False)
        for name, data in [
            ("date.yaml", b"project: p\ntasks:\n  - id: a\n    input: 2024-13-45\n"),
            (
                "deep.jsonl",
                b'{"project":"p","id":"a","input":' + b"[" * 3_000 + b"]" * 3_000 + b"}",
            ),
        ]:
            (tmp_path / "inbox" / name).write_bytes(data)
        assert inbox.scan() == []
        rejected = sorted(p.name for p in (tmp_path / "inbox" / "rejected").iterdir())
        assert rejected == [
            "date.yaml",
            "date.yaml.error.txt",
            "deep.jsonl",
            "deep.jsonl.error.txt",
        ]
        note = (tmp_path / "inbox" / "rejected" / "date.yaml.error.txt").read_text()
        assert note.startswith("date.yaml: line 4: not valid YAML: bad timestamp value")
    finally:
        store.close()
