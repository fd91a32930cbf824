"""CLI conventions: every command's --help ends with examples that its own parser accepts, defaults shown as
they are, one learning-rate default, choices listed."""

import shlex

import click
import pytest
import typer.main

from lorafleet.cli import app, main


def _leaves(cmd, path=()):
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


ROOT = typer.main.get_command(app)
COMMANDS = list(_leaves(ROOT))


def _examples(cmd):
    return [line.strip() for line in (cmd.epilog or "").split("\n\n") if line.strip().startswith("lorafleet ")]


def test_every_registered_command_is_walked():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"client", "serve", "train", "fleet", "package inspect", "cache remove", "node-key"} <= names
    assert len(names) >= 18


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_examples_its_parser_accepts(path, cmd, capsys):
    examples = _examples(cmd)
    assert examples, f"lorafleet {' '.join(path)} --help has no example"
    assert main([*path, "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "Examples:" in shown
    for line in examples:
        words = shlex.split(line)
        assert words[:1 + len(path)] == ["lorafleet", *path], line
        assert " ".join(words) in shown, line  # rendered whole (rich re-flows, so compare whitespace-free)
        cmd.make_context(" ".join(path), words[1 + len(path):])  # click's own parsing and type conversion


def test_serve_min_valid_shows_the_default_it_has(capsys):
    assert main(["serve", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())
    option = shown[shown.index("--min-valid INTEGER"):shown.index("--fraction FLOAT")]
    assert option.endswith("[default: (--min-clients)] "), option


def _default(path, flag):
    cmd = dict(COMMANDS)[path]
    return next(p.default for p in cmd.params if flag in getattr(p, "opts", ()))


def test_one_learning_rate_default():
    from lorafleet.fleet.config import FleetConfig

    assert _default(("train",), "--lr") == _default(("serve",), "--lr") == 1e-3
    assert FleetConfig.__dataclass_fields__["lr"].default == 1e-3  # fleet's --lr defaults to its config


def test_fleet_method_is_a_choice(capsys):
    cmd = dict(COMMANDS)[("fleet",)]
    method = next(p for p in cmd.params if "--method" in p.opts)
    assert isinstance(method.type, click.Choice) and "flexlora" in method.type.choices
    code = main(["fleet", "--method", "fedsgd", "--model", "random:tiny", "--out", "x"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "--method must be one of" in err, err
