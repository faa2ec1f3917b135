"""Every option of every stage, read off the argparse parser (so that a new flag is covered
without editing a list), and a non-default value for each: the tables behind the tests that
check that each flag reaches its method and that each result-affecting one is in a reuse key."""

from __future__ import annotations

import argparse

from et_circuits.pipeline import cli


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(command: str) -> dict[str, argparse.Action]:
    """dest -> action of every option of `command` but --help."""
    actions = subparsers()[command]._actions
    return {a.dest: a for a in actions if a.option_strings and not isinstance(a, argparse._HelpAction)}


# Values the generic rule below cannot guess: another top-k, a screen where none is the default.
SPECIAL = {"top_k": ["1", "1", "1", "1"], "screen": ["8"]}


def other_value(action: argparse.Action, current: str | None = None) -> list[str]:
    """Command-line tokens giving `action` a valid value other than `current` (the text given on
    a command line; None: its default)."""
    if action.dest in SPECIAL:
        return SPECIAL[action.dest]
    if isinstance(action, argparse._StoreTrueAction):
        return []
    default = action.default if current is None else action.type(current)
    if action.choices is not None:
        default_set = set(default) if isinstance(default, list) else {default}
        return [next(str(c) for c in action.choices if c not in default_set)]
    name = getattr(action.type, "__name__", "")
    if name in ("positive", "count", "boxes", "int"):
        return [str(default + 1 if name != "boxes" else default - 1)]
    if name in ("fraction", "positive_float", "non_negative_float"):
        return [str(default / 2 if default else 0.5)]
    raise KeyError(f"no other value known for --{action.dest} (type {name or action.type}); add it to SPECIAL")


def flag(action: argparse.Action) -> str:
    return action.option_strings[0]


def current(argv: list[str], action: argparse.Action) -> str | None:
    """The value `argv` gives `action` (its first token), or None."""
    for i, token in enumerate(argv):
        if token in action.option_strings:
            return argv[i + 1] if action.nargs != 0 else token
    return None


def without(argv: list[str], action: argparse.Action) -> list[str]:
    """`argv` less `action`'s option and its values."""
    out, skipping = [], False
    for token in argv:
        if token in action.option_strings:
            skipping = action.nargs != 0
            continue
        if skipping and not token.startswith("--"):
            continue
        skipping = False
        out.append(token)
    return out


def changed(argv: list[str], action: argparse.Action) -> list[str]:
    """`argv` with `action` alone given another value (a store_true flag toggled)."""
    out = without(argv, action)
    if isinstance(action, argparse._StoreTrueAction):
        return out if len(out) < len(argv) else [*out, flag(action)]
    return [*out, flag(action), *other_value(action, current(argv, action))]
