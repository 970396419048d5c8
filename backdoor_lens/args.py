"""The shared command-line flags (BackdoorBench's names), YAML defaults, and validation.

Precedence: built-in defaults < the YAML file (--yaml_path) < flags given on the command line.
A YAML value goes through the same conversion and checks as the flag would (its argparse `type`
and `choices`), so a wrong type or range ends with one line naming the key. Trust in a record
(--trust_record) comes from the command line only, never from a file.
"""
import argparse
import math
from pathlib import Path

import yaml

from backdoor_lens.errors import UserError
from backdoor_lens.record.splits import SPLITS

# numpy's legacy seeding (np.random.seed, used by seed_everything and by BackdoorBench) takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message):
        raise UserError(f"{message}; see --help")


def integer_in(minimum: int, maximum: int | None = None):
    """An argparse `type`: an integer in [minimum, maximum] (no upper bound when maximum is None)."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} must be at most {maximum}")
        return value

    return integer


def fraction(text: str) -> float:
    """An argparse `type`: a number between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} must lie between 0 and 1")
    return value


def add_shared_arguments(parser: argparse.ArgumentParser, default_split: str = "clean_test") -> None:
    group = parser.add_argument_group("record and data")
    group.add_argument("--result_file_attack", "--result_file", dest="result_file_attack",
                       help="BackdoorBench record folder (record/<name>) or its attack_result.pt")
    group.add_argument("--result_file_defense", help="defense folder (record/<name>/defense/<d>) or defense_result.pt")
    group.add_argument("--prototype", action="store_true", help="read a clean prototype record (clean_model.pth)")
    group.add_argument("--trust_record", action="store_true",
                       help="allow arbitrary pickled objects in the record (only for files you trust); "
                            "accepted on the command line only, never from --yaml_path")
    group.add_argument("--dataset_path", help="the clean dataset's folder (default: beside the record's BackdoorBench root)")
    group.add_argument("--model", help="override the record's model name")
    group.add_argument("--dataset", help="override the record's dataset name")
    group.add_argument("--num_classes", type=integer_in(1), help="override the record's class count")
    group.add_argument("--visual_dataset", default=default_split,
                       help="split: clean_train, bd_train, clean_test, bd_test (the poisoned non-target test "
                            "samples), mixed (BackdoorBench's: the N clean test samples with int(pratio x N) "
                            "non-target ones, chosen with --seed, replaced by their poisoned versions; N samples "
                            "in all) or subset (stratified --n_sub of bd_train)")
    group.add_argument("--n_sub", type=integer_in(1), help="cap the number of samples (stratified)")
    group.add_argument("--c_sub", type=integer_in(1), help="cap the number of classes (the target class is kept)")
    group.add_argument("--pratio", type=fraction, default=0.1,
                       help="'mixed' serves int(pratio x N) of the N clean test samples poisoned (BackdoorBench's "
                            "truncation), replacing their clean versions; only non-target samples with a poisoned "
                            "version in bd_test are chosen")
    group.add_argument("--target_class", type=integer_in(0), help="the attack target (default: read from the record)")
    group.add_argument("--target_layer_name", help="layer to analyse (default: the model's last conv block)")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", help="write outputs to <output_dir>/<method>/ instead of <record>/visual/<method>/")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: CUDA when present)")
    run.add_argument("--batch_size", type=integer_in(1), default=128)
    run.add_argument("--num_workers", type=integer_in(0), default=0)
    run.add_argument("--seed", type=integer_in(0, MAX_SEED), default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--pdf", action="store_true", help="also write figures as PDF")
    run.add_argument("--yaml_path", help="YAML file of default values for any of these flags (not --trust_record)")


def build_parser(add_arguments=None, description: str = "", default_split: str = "clean_test") -> argparse.ArgumentParser:
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_arguments(parser, default_split)
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    # The script's own default (e.g. "auto", resolved in its run()) is a valid split name for it alone.
    split_names = SPLITS + tuple(name for name in [parser.get_default("visual_dataset")] if name not in SPLITS)
    first = parser.parse_args(argv)
    if first.yaml_path:
        parser.set_defaults(**_yaml_defaults(parser, Path(first.yaml_path)))
        first = parser.parse_args(argv)
    if not first.result_file_attack:
        raise UserError("no record given; pass --result_file_attack record/<name> (a BackdoorBench record folder)")
    _check_split_names(first.visual_dataset, split_names)
    return first


def _check_split_names(text: str, split_names: tuple) -> None:
    """Every comma-separated name must be a split (lists are for the scripts that take several)."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise UserError(f"--visual_dataset names no split; choose one of {', '.join(split_names)}")
    for name in names:
        if name not in split_names:
            raise UserError(f"unknown --visual_dataset {name!r}; choose one of {', '.join(split_names)}")


def _yaml_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The YAML file's values, converted and checked like the flags they stand for."""
    if not path.is_file():
        raise UserError(f"--yaml_path {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--yaml_path {path} is not valid YAML ({str(error).splitlines()[0]})")
    if not isinstance(values, dict):
        raise UserError(f"--yaml_path {path} must map flag names to values")
    if "trust_record" in values:
        raise UserError(f"--yaml_path {path} sets trust_record; trust in a record is given on the command line only "
                        f"(--trust_record), never by a file: remove the key")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(str(key) for key in set(values) - set(actions))
    if unknown:
        raise UserError(f"--yaml_path {path} sets unknown options: {', '.join(unknown)}")
    # null keeps the built-in default, as if the key were absent.
    return {key: _yaml_value(actions[key], value, f"--yaml_path {path}: {key}")
            for key, value in values.items() if value is not None}


def _yaml_value(action: argparse.Action, value, where: str):
    if action.nargs == 0:  # an on/off flag (store_true)
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, not {value!r}")
        return value
    if action.type is None:  # a text flag: a list or a mapping is no text
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{where} must be a text, not {value!r}")
        converted = str(value)
    else:
        # The flag's own conversion of the value as it would be typed: a list or 2.5 is no integer.
        try:
            converted = action.type(str(value))
        except argparse.ArgumentTypeError as error:
            raise UserError(f"{where}: {error}") from None
        except (TypeError, ValueError):
            expected = {int: "an integer", float: "a number"}.get(action.type, f"a value --{action.dest} accepts")
            raise UserError(f"{where} must be {expected}, not {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where} is {converted!r}; choose one of {', '.join(map(str, action.choices))}")
    return converted


def make_args(add_arguments=None, default_split: str = "clean_test", **values) -> argparse.Namespace:
    """Arguments for calling a script's run() from Python (notebooks, demo, tests)."""
    argv = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}" if value is True else f"--{key}={value}")
    return parse_args(build_parser(add_arguments, default_split=default_split), argv)
