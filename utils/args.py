"""The shared command-line flags (BackdoorBench's names), YAML defaults, and validation.

Precedence: built-in defaults < the YAML file (--yaml_path) < flags given on the command line.
"""
import argparse
from pathlib import Path

import yaml

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message):
        raise UserError(f"{message}; see --help")


def add_shared_arguments(parser: argparse.ArgumentParser, default_split: str = "clean_test") -> None:
    group = parser.add_argument_group("record and data")
    group.add_argument("--result_file_attack", "--result_file", dest="result_file_attack",
                       help="BackdoorBench record folder (record/<name>) or its attack_result.pt")
    group.add_argument("--result_file_defense", help="defense folder (record/<name>/defense/<d>) or defense_result.pt")
    group.add_argument("--prototype", action="store_true", help="read a clean prototype record (clean_model.pth)")
    group.add_argument("--trust_record", action="store_true",
                       help="allow arbitrary pickled objects in the record (only for files you trust)")
    group.add_argument("--dataset_path", help="the clean dataset's folder (default: beside the record's BackdoorBench root)")
    group.add_argument("--model", help="override the record's model name")
    group.add_argument("--dataset", help="override the record's dataset name")
    group.add_argument("--num_classes", type=int, help="override the record's class count")
    group.add_argument("--visual_dataset", default=default_split,
                       help="split: clean_train, bd_train, clean_test, bd_test, mixed or subset")
    group.add_argument("--n_sub", type=int, help="cap the number of samples (stratified)")
    group.add_argument("--c_sub", type=int, help="cap the number of classes (the target class is kept)")
    group.add_argument("--pratio", type=float, default=0.1, help="share of poisoned test samples in 'mixed'")
    group.add_argument("--target_class", type=int, help="the attack target (default: read from the record)")
    group.add_argument("--target_layer_name", help="layer to analyse (default: the model's last conv block)")
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", help="write outputs to <output_dir>/<method>/ instead of <record>/visual/<method>/")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: CUDA when present)")
    run.add_argument("--batch_size", type=int, default=128)
    run.add_argument("--num_workers", type=int, default=0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--pdf", action="store_true", help="also write figures as PDF")
    run.add_argument("--yaml_path", help="YAML file of default values for any of these flags")


def build_parser(add_arguments=None, description: str = "", default_split: str = "clean_test") -> argparse.ArgumentParser:
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_arguments(parser, default_split)
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    first = parser.parse_args(argv)
    if first.yaml_path:
        path = Path(first.yaml_path)
        if not path.is_file():
            raise UserError(f"--yaml_path {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"--yaml_path {path} is not valid YAML ({str(error).splitlines()[0]})")
        if not isinstance(values, dict):
            raise UserError(f"--yaml_path {path} must map flag names to values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"--yaml_path {path} sets unknown options: {', '.join(unknown)}")
        parser.set_defaults(**values)
        first = parser.parse_args(argv)
    if not first.result_file_attack:
        raise UserError("no record given; pass --result_file_attack record/<name> (a BackdoorBench record folder)")
    for flag in ("batch_size",):
        if getattr(first, flag) is not None and getattr(first, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if not 0.0 <= first.pratio <= 1.0:
        raise UserError(f"--pratio {first.pratio} must lie between 0 and 1")
    return first


def make_args(add_arguments=None, default_split: str = "clean_test", **values) -> argparse.Namespace:
    """Arguments for calling a script's run() from Python (notebooks, demo, tests)."""
    argv = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}" if value is True else f"--{key}={value}")
    return parse_args(build_parser(add_arguments, default_split=default_split), argv)
