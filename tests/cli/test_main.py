"""`harness COMMAND`: every command reaches a module with a main(), and bad usage is one line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from harness.cli.main import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_an_entry_point(command):
    module = importlib.import_module(COMMANDS[command][0])
    assert callable(getattr(module, "main", None)), command


def test_unknown_and_missing_commands_exit_2(capsys):
    for argv in ([], ["trian"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_world_size_without_check_is_refused_instead_of_a_one_rank_run(capsys):
    from harness.cli.train import main

    assert main([str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"), "--world-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "--world-size 8 only goes with --check" in err and err.strip().count("\n") == 0
