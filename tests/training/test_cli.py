"""`cbir train`'s command line (services/training/cli.py): the options and their refusals, the command a
bundle records (which parses back into the same run), and the recipe as JSON."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from services.embedder.bundle import DEFAULT_BUNDLE_DIR
from services.embedder.model import BACKBONES, DEFAULT_BACKBONE
from services.training.bovw import get_args_parser as bovw_parser
from services.training.cli import defaults, get_args_parser, jsonable, recorded_command


@pytest.mark.parametrize(("argv", "message"), [
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear' (choose from 'onecycle', 'cosine')"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--arch", "ResNet9"], "argument --arch: invalid choice: 'ResNet9'"),
    (["--pretrained", "imagenet21k"], "argument --pretrained: invalid choice: 'imagenet21k'"),
])
def test_a_bad_value_is_refused_with_the_option_and_the_value_named(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        get_args_parser().parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_defaults_are_the_documented_recipe() -> None:
    values = defaults()
    assert values == vars(get_args_parser().parse_args([]))
    assert (values["arch"], values["output"], values["epochs"], values["batch_size"]) == (
        DEFAULT_BACKBONE, DEFAULT_BUNDLE_DIR, 40, 256)
    assert values["flip_tta"] is True and values["bf16"] is True and values["teacher"] is None
    assert get_args_parser().parse_args(["--no-flip-tta", "--no-bf16"]).flip_tta is False


def test_every_option_has_help_and_every_backbone_is_a_choice() -> None:
    parser = get_args_parser()
    options = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert len(options) == len(defaults())
    assert [action.option_strings for action in options if not action.help] == []
    arch = next(action for action in options if action.dest == "arch")
    assert list(arch.choices) == list(BACKBONES)


def test_the_parser_extends_as_a_parent_without_its_help() -> None:
    parser = argparse.ArgumentParser(parents=[get_args_parser(add_help=False)])
    parser.add_argument("--sweep", type=int, default=1)
    args = parser.parse_args(["--epochs", "3", "--sweep", "4"])
    assert (args.epochs, args.sweep, args.lr) == (3, 4, 0.1)


def test_the_recorded_command_names_only_what_differs_and_parses_back_into_the_same_run() -> None:
    argv = ["--epochs", "3", "--lr", "0.05", "--no-flip-tta", "--teacher", "a", "--teacher", "b",
            "--output", "models/x", "--resume", "--quiet", "--threads", "2", "--checkpoint-every", "5"]
    args = get_args_parser().parse_args(argv)
    command = recorded_command(args)
    assert command == ("cbir train --output models/x --epochs 3 --lr 0.05 --teacher a --teacher b "
                       "--no-flip-tta")  # how the run goes (resume, quiet, threads, checkpoints) is not recorded
    again = get_args_parser().parse_args(shlex.split(command)[2:])
    unrecorded = {"resume", "quiet", "threads", "checkpoint_every"}
    assert {k: v for k, v in vars(again).items() if k not in unrecorded} == {
        k: v for k, v in vars(args).items() if k not in unrecorded}
    assert recorded_command(get_args_parser().parse_args([])) == "cbir train"


def test_another_commands_parser_records_under_its_own_name() -> None:
    args = bovw_parser().parse_args(["--folds", "3", "--jobs", "4", "--quiet"])
    assert recorded_command(args, parser=bovw_parser(), not_recorded=("quiet", "jobs")) == "cbir train-bovw --folds 3"


def test_jsonable_turns_paths_into_strings_and_keeps_everything_else() -> None:
    args = get_args_parser().parse_args(["--teacher", "t1", "--teacher", "t2", "--init-bundle", "p"])
    recipe = jsonable(vars(args))
    assert recipe["teacher"] == ["t1", "t2"] and recipe["init_bundle"] == "p"
    assert recipe["output"] == str(DEFAULT_BUNDLE_DIR) and recipe["data_dir"] is None
    assert {k: v for k, v in recipe.items() if not isinstance(vars(args)[k], Path | list)} == {
        k: v for k, v in vars(args).items() if not isinstance(v, Path | list)}
    assert json.loads(json.dumps(recipe)) == recipe
