"""The shared entry point of every visual_*.py: parse, run, and turn UserError into one line."""
import sys
from pathlib import Path

from .args import build_parser, parse_args
from .errors import UserError


def main(run, add_arguments=None, description: str = "", default_split: str = "clean_test", argv=None) -> int:
    try:
        parser = build_parser(add_arguments, description=description, default_split=default_split)
        args = parse_args(parser, argv)
        summary = run(args)
    except UserError as error:
        script = Path(sys.argv[0]).name or "backdoor-lens"
        print(f"{script}: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the analysis did not finish, so no outputs were moved into place", file=sys.stderr)
        sys.exit(130)
    if isinstance(summary, dict) and "output_dir" in summary:
        print(f"outputs in {summary['output_dir']}")
    return 0
