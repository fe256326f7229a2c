"""What owners and admins write and read for quorum, trust and spot checks: project.yaml's
``tolerance``, a task file's ``expect``, and issc-ctl's TRUST and VERDICT columns."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from hub.ctl import show_task, show_volunteers
from hub.store import TaskEntry
from hub.taskfile import MAX_INPUT_BYTES, parse_task_file
from issc.errors import BundleError, TaskFileError
from issc.manifest import (
    Limits,
    Manifest,
    manifest_from_bytes,
    manifest_to_bytes,
    parse_project_yaml,
)

PROJECT_YAML = "name: sums\nversion: 1\nentrypoint: [python3, main.py]\nquorum: 2\n"


# ---- project.yaml: tolerance ------------------------------------------------------------------


def test_tolerance_is_optional_and_a_non_negative_number(tmp_path: Path) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(PROJECT_YAML)
    assert parse_project_yaml(path).tolerance is None  # exact equality
    for text, value in (("0", 0.0), ("1.0e-6", 1e-6), ("0.5", 0.5), ("2", 2.0)):
        path.write_text(PROJECT_YAML + f"tolerance: {text}\n")
        assert parse_project_yaml(path).tolerance == value


@pytest.mark.parametrize("bad", ["-0.1", "true", "x", ".nan", ".inf", "[0.1]"])
def test_a_bad_tolerance_names_the_file_and_the_key(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(PROJECT_YAML + f"tolerance: {bad}\n")
    with pytest.raises(BundleError, match=r"project\.yaml: tolerance: must be a number >= 0"):
        parse_project_yaml(path)


@pytest.mark.parametrize("text", ["1e-6", "'0.1'"])
def test_a_tolerance_that_yaml_reads_as_text_says_so(tmp_path: Path, text: str) -> None:
    path = tmp_path / "project.yaml"
    path.write_text(PROJECT_YAML + f"tolerance: {text}\n")
    with pytest.raises(BundleError, match="is text to YAML: write it with a decimal point"):
        parse_project_yaml(path)


def manifest(tolerance: float | None) -> Manifest:
    return Manifest(
        name="sums",
        version=1,
        entrypoint=("python3", "main.py"),
        mode="process",
        limits=Limits(),
        quorum=2,
        files=(),
        owner_key="ed25519:" + "A" * 43 + "=",
        tolerance=tolerance,
    )


def test_the_signed_manifest_carries_a_tolerance_and_round_trips() -> None:
    data = manifest_to_bytes(manifest(0.001))
    assert json.loads(data)["tolerance"] == 0.001
    assert manifest_from_bytes(data) == manifest(0.001)


def test_a_manifest_without_tolerance_is_unchanged() -> None:
    # Bundles signed before the key existed verify exactly as they did.
    data = manifest_to_bytes(manifest(None))
    assert "tolerance" not in json.loads(data)
    assert manifest_from_bytes(data).tolerance is None


def test_a_manifest_with_a_bad_tolerance_is_refused() -> None:
    document = json.loads(manifest_to_bytes(manifest(None)))
    document["tolerance"] = -1
    with pytest.raises(BundleError, match=r"manifest\.json: tolerance: must be a number >= 0"):
        manifest_from_bytes(json.dumps(document).encode())


# ---- task files: expect -------------------------------------------------------------------


def test_expect_is_a_known_answer_in_yaml_and_jsonl() -> None:
    yaml_data = textwrap.dedent(
        """\
        project: primes
        tasks:
          - {id: r-1, input: {lo: 0, hi: 10}, expect: 4}
          - {id: r-2, input: {lo: 10, hi: 20}}
          - {id: r-3, input: 1, expect: null}
        """
    ).encode()
    parsed = parse_task_file("t.yaml", yaml_data)
    assert parsed.entries == [
        TaskEntry("r-1", '{"lo":0,"hi":10}', 3, expect_json="4"),
        TaskEntry("r-2", '{"lo":10,"hi":20}', 4),
        TaskEntry("r-3", "1", 5, expect_json="null"),  # null is an answer too
    ]
    jsonl = "".join(
        json.dumps(line) + "\n"
        for line in (
            {"project": "primes", "id": "r-1", "input": {"lo": 0}, "expect": {"count": [4]}},
            {"project": "primes", "id": "r-2", "input": {"lo": 10}},
        )
    ).encode()
    entries = parse_task_file("t.jsonl", jsonl).entries
    assert [e.expect_json for e in entries] == ['{"count":[4]}', None]


def test_expect_is_checked_like_input() -> None:
    data = b'{"project": "p", "id": "a", "input": 1, "expect": NaN}\n'
    with pytest.raises(TaskFileError, match="not valid JSON"):
        parse_task_file("t.jsonl", data)
    big = json.dumps({"project": "p", "id": "a", "input": 1, "expect": "x" * MAX_INPUT_BYTES})
    with pytest.raises(TaskFileError, match=r"task 'a': expect is \d+ bytes, over the"):
        parse_task_file("t.jsonl", (big + "\n").encode())
    with pytest.raises(TaskFileError, match="line 3: task 'b': expect is not JSON-serialisable"):
        parse_task_file("t.yaml", b"project: p\ntasks:\n  - {id: b, input: 1, expect: !!set {a}}\n")


# ---- issc-ctl: TRUST and VERDICT ------------------------------------------------------------


def test_volunteers_show_trust_beside_credit() -> None:
    data = [
        {"volunteer": "alice", "credit": 3.0, "tasks_completed": 2, "trusted": True,
         "agreed": 2, "disagreed": 0, "nodes": 1},
        {"volunteer": "mallory", "credit": 0.0, "tasks_completed": 0, "trusted": False,
         "agreed": 1, "disagreed": 3, "nodes": 1},
        {"volunteer": "new", "credit": 0.0, "tasks_completed": 0, "trusted": True,
         "agreed": 0, "disagreed": 0, "nodes": 0},
    ]  # fmt: skip
    assert show_volunteers(data, argparse.Namespace()).splitlines() == [
        "VOLUNTEER  CREDIT  TASKS COMPLETED  TRUST              NODES",
        "alice        3.00                2  yes (2 ok, 0 bad)      1",
        "mallory      0.00                0  NO (1 ok, 3 bad)       1",
        "new          0.00                0  yes                    0",
    ]


def test_task_detail_shows_verdicts_only_where_results_had_to_agree() -> None:
    history = [
        {"lease": 1, "node": "n-a", "offered_at": "2026-11-28T07:00:00Z",
         "accepted_at": "2026-11-28T07:00:01Z", "ended_at": "2026-11-28T07:00:05Z",
         "outcome": "completed", "detail": None, "verdict": "agreed"},
        {"lease": 2, "node": "n-b", "offered_at": "2026-11-28T07:00:00Z",
         "accepted_at": "2026-11-28T07:00:01Z", "ended_at": "2026-11-28T07:00:06Z",
         "outcome": "completed", "detail": None, "verdict": "disagreed"},
    ]  # fmt: skip
    data = {"id": "t", "state": "C", "attempts": 2, "node": "n-a", "error": None}
    text = show_task({**data, "history": history}, argparse.Namespace())
    assert "VERDICT" in text.splitlines()[1]
    assert text.splitlines()[3].split()[-1] == "disagreed"
    plain = [{k: v for k, v in h.items() if k != "verdict"} for h in history]
    assert "VERDICT" not in show_task({**data, "history": plain}, argparse.Namespace())


def test_a_billion_laughs_in_expect_is_refused_before_it_is_expanded() -> None:
    lines = ["project: p", "tasks:", "  - id: a", "    input: 1", "    expect:"]
    lines.append("      - &l0 [1,1,1,1,1,1,1,1,1,1]")
    for i in range(1, 9):  # 10**9 ones in a 700-byte file
        lines.append(f"      - &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    with pytest.raises(TaskFileError, match="expect expands to more than") as caught:
        parse_task_file("t.yaml", ("\n".join(lines) + "\n").encode())
    assert caught.value.line == 3
