"""The inbox hears of completed files from inotify (hub/dirwatch.py) and reads them at
once, instead of after the poll interval and the settle scan."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from hub import runtime as runtime_module
from hub.app import serving
from hub.dirwatch import DirWatch
from issc.config import load_hub_config
from issc.project_cli import drop_into_inbox

pytestmark = pytest.mark.timeout(60)


def watch_of(directory: Path) -> DirWatch:
    watch = DirWatch(directory)
    if not watch.available:
        pytest.skip("inotify is not available here")
    return watch


def test_a_file_renamed_in_or_closed_after_writing_is_completed(tmp_path: Path) -> None:
    watch = watch_of(tmp_path)
    (tmp_path / ".tasks.jsonl.tmp").write_text("{}\n")
    os.rename(tmp_path / ".tasks.jsonl.tmp", tmp_path / "tasks.jsonl")
    (tmp_path / "copied.yaml").write_text("project: p\n")
    assert watch.read_events()
    assert watch.take() == {"tasks.jsonl", "copied.yaml"}  # hidden names are no news
    assert watch.take() == set()
    watch.close()


def test_issc_project_submit_drops_a_completed_file(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watch = watch_of(inbox)
    source = tmp_path / "tasks.jsonl"
    source.write_text('{"project": "p", "id": "1", "input": 1}\n')
    drop_into_inbox(source, inbox)
    assert watch.read_events()
    assert "tasks.jsonl" in watch.take()
    watch.close()


def test_a_file_still_open_for_writing_is_not_completed(tmp_path: Path) -> None:
    watch = watch_of(tmp_path)
    with (tmp_path / "growing.jsonl").open("w") as growing:
        growing.write("{}\n")
        growing.flush()
        watch.read_events()
        assert "growing.jsonl" not in watch.take()
    assert watch.read_events()
    assert watch.take() == {"growing.jsonl"}
    watch.close()


async def test_the_hub_reads_a_dropped_file_without_waiting_for_the_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch_of(tmp_path).close()
    # With the poll an hour apart only the watch can have the file read: without it (or
    # with the settle scan still applied to it) this test times out.
    monkeypatch.setattr(runtime_module, "INBOX_POLL", 3600.0)
    data = tmp_path / "h"
    config_file = tmp_path / "hub.yaml"
    config_file.write_text(f"listen: 127.0.0.1:0\ndata_dir: {data}\n", encoding="utf-8")
    async with serving(load_hub_config(config_file)):
        await asyncio.sleep(0.2)  # the first scan, at start, has run
        inbox = data / "inbox"
        hidden = inbox / ".broken.jsonl"
        hidden.write_text('{"project": "nosuch", "id": "t-1", "input": 1}\n')
        hidden.rename(inbox / "broken.jsonl")
        rejected = inbox / "rejected" / "broken.jsonl.error.txt"
        deadline = time.monotonic() + 20
        while not rejected.exists():
            assert time.monotonic() < deadline, "the dropped file was not read"
            await asyncio.sleep(0.02)
        assert "unknown project" in rejected.read_text()
