"""The command line: `backdoor-lens list | <analysis> [flags] | all <record> | report <record>`.

The root-level `visual_<name>.py` scripts call `run_analysis(name)`; `python -m backdoor_lens` is
the same command as `backdoor-lens`. A UserError anywhere below becomes one line and exit code 2.
"""
import sys
from pathlib import Path

from .args import build_parser, parse_args
from .errors import UserError


def run_declared(analysis, argv=None) -> int:
    """Parse the shared and the analysis's own flags, run it, and turn UserError into one line."""
    try:
        description = getattr(sys.modules.get(analysis.module), "__doc__", None) or analysis.title
        parser = build_parser(analysis.add_arguments, description=description, default_split=analysis.default_split)
        args = parse_args(parser, argv)
        summary = analysis.run(args)
    except UserError as error:
        print(f"{_program(analysis)}: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the analysis did not finish, so no outputs were moved into place", file=sys.stderr)
        sys.exit(130)
    if isinstance(summary, dict) and "output_dir" in summary:
        print(f"outputs in {summary['output_dir']}")
    return 0


def _program(analysis) -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("visual_") else f"backdoor-lens {analysis.name}"


def run_analysis(name: str, argv=None) -> int:
    """What `python visual_<name>.py ...` runs."""
    from .analysis import get

    try:
        analysis = get(name)
    except UserError as error:
        print(f"backdoor-lens: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    return run_declared(analysis, argv)


USAGE = """usage: backdoor-lens list
       backdoor-lens <analysis> --result_file_attack record/<name> [flags]   (--help for its flags)
       backdoor-lens all record/<name> [--result_file_defense DIR] [--dataset_path DIR] [--only a,b]
       backdoor-lens report record/<name> [--defense DIR]"""


def main(argv=None) -> int:
    from .analysis import registry

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if argv else 2
        command, rest = argv[0], argv[1:]
        if command == "list":
            for analysis in registry().values():
                splits = ", ".join(analysis.splits) if analysis.splits else "weights only"
                print(f"{analysis.name:<10} {analysis.title} [{splits}]")
            return 0
        if command == "all":
            from .runner import main as run_all

            return run_all(rest)
        if command == "report":
            from .report.build import main as report

            return report(rest)
        table = registry()
        if command not in table:
            raise UserError(f"no analysis or command called {command!r}; known analyses: {', '.join(table)}; "
                            f"commands: list, all, report")
        return run_declared(table[command], rest)
    except UserError as error:
        print(f"backdoor-lens: error: {error}", file=sys.stderr)
        return UserError.exit_code
