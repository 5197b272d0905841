"""``lora-search --help`` and every subcommand's ``--help`` explain every subcommand and argument;
``--debug`` works before or after the subcommand."""

from __future__ import annotations

import argparse

import pytest

from search.cli import build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def summaries() -> dict[str, str]:
    """The one-line help ``lora-search --help`` lists for each subcommand."""
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_every_subcommand_has_a_summary_and_a_description():
    parsers = subcommands()
    assert {"attach", "check", "export", "resume", "start", "status", "stop", "train", "worker"} <= set(parsers)
    assert set(summaries()) == set(parsers)
    for name, summary in summaries().items():
        assert summary and summary.strip(), f"{name} has no summary in lora-search --help"
        assert parsers[name].description and parsers[name].description.strip(), f"{name} --help has no description"


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_argument_of_every_subcommand_has_help(name, capsys):
    parser = subcommands()[name]
    for action in parser._actions:
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), \
            f"lora-search {name}: {label} has no help text"
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith(f"usage: lora-search {name}")
    assert "--debug" in out and parser.description.split()[0] in out


@pytest.mark.parametrize("argv", [["--debug", "check"], ["check", "--debug"]])
def test_debug_before_or_after_the_subcommand_shows_the_traceback(argv, tmp_path, capsys):
    missing = str(tmp_path / "missing.toml")
    assert main([*argv, missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "not found" in err
    assert err.rstrip().splitlines()[-1].startswith("lora-search check: error:")


def test_without_debug_an_error_is_one_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["status", "--debug"], ["--debug", "status"]])
def test_debug_after_a_study_subcommand_parses(argv):
    args = build_parser().parse_args(argv)
    assert args.debug is True and args.command == "status"
    assert build_parser().parse_args(["status"]).debug is False
