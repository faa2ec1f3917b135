"""The command line answers at once: its parser loads no torch, every flag explains itself, and
models are named one way (`--models`, alias `--model`; `--base`) in every command."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from et_circuits.models import registry
from et_circuits.pipeline import args, cli


def _imports(*argv: str) -> tuple[int, str]:
    """(exit status, every module imported) of `python -m et_circuits <argv>` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "et_circuits", *argv], capture_output=True, text=True, timeout=60
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["circuit", "--help"], 0),
        (["circuit", "--models", "m", "--top-k-cap", "2"], 2),
        # commands joined by --then are all parsed before the first runs
        (["circuit", "--models", "m", "--then", "table1", "--base", "m", "--random", "0"], 2),
        (["circuit", "--models", "m", "--then"], 2),
    ],
)
def test_help_and_argument_errors_load_no_torch(argv, code):
    status, imported = _imports(*argv)
    assert status == code
    names = {line.rsplit("|", 1)[-1].strip() for line in imported.splitlines() if line.startswith("import time:")}
    assert "et_circuits.pipeline.cli" in names  # the parser did run
    assert not {n for n in names if n == "torch" or n.startswith(("torch.", "transformer_lens", "transformers"))}


def test_commands_joined_by_then_parse_each_with_its_own_options():
    parser = cli.build_parser()
    first, second = cli.parse_commands(
        parser, ["circuit", "--models", "a", "--n", "7", "--then", "table1", "--base", "a", "--models", "a", "b"]
    )
    assert (first.command, first.models, first.n) == ("circuit", ["a"], 7)
    assert (second.command, second.base, second.n) == ("table1", "a", 500)
    assert [a.command for a in cli.parse_commands(parser, ["report"])] == ["report"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_chained_commands_run_in_order_and_the_ranks_meet_between_them(monkeypatch):
    """Under torchrun the next command may read what the last one wrote on another rank (Table 1
    reads the circuit.json rank 0 writes): every rank waits for the others between commands."""
    from et_circuits.core import distributed

    happened = []
    monkeypatch.setattr(cli, "run_command", lambda a, where: happened.append(a.command) or 0)
    monkeypatch.setattr(distributed, "barrier", lambda: happened.append("barrier"))
    argv = ["report", "--then", "knockout", "--model", "m", "--then", "report"]
    assert cli.main(argv) == 0
    assert happened == ["report", "barrier", "knockout", "barrier", "report"]


def test_every_flag_has_help():
    missing = [
        f"{name} {action.option_strings[0]}"
        for name, p in _subcommands().items()
        for action in p._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


def test_models_are_named_one_way_in_every_command():
    for name, p in _subcommands().items():
        flags = {s for a in p._actions for s in a.option_strings}
        assert not ({"--model", "--models"} - flags) or not ({"--model", "--models"} & flags), name
        parsed = p.parse_args(["--model", "a", "b", *(["--base", "a"] if "--base" in flags else [])])
        assert parsed.models == ["a", "b"], name


def test_the_registry_variable_is_the_one_models_read():
    assert args.REGISTRY_VAR == registry.REGISTRY_VAR


@pytest.mark.parametrize("rank, shown", [(None, True), ("0", True), ("1", False)])
def test_progress_bars_show_on_the_first_process_only(monkeypatch, rank, shown):
    from et_circuits.pipeline.running import settings

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    argv = ["circuit", "--models", "organism-llama"]
    assert settings(cli.build_parser().parse_args(argv)).progress is shown
    assert settings(cli.build_parser().parse_args([*argv, "--quiet"])).progress is False
