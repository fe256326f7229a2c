"""``issc-hub`` refuses to start with one line naming the cause, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.cli import main


def test_a_data_dir_that_cannot_be_made_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "hub.yaml"
    config.write_text(f"listen: 127.0.0.1:0\ndata_dir: {blocker / 'data'}\n")
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("issc-hub: error: "), err
    assert str(blocker / "data") in err and "Traceback" not in err, err


def test_a_bad_config_key_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text("listen: 127.0.0.1:0\nheartbeat_intervall: 5\n")
    assert main(["--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "heartbeat_intervall" in err and str(config) in err, err
