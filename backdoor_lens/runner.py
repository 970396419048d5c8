"""`backdoor-lens all`: every registered analysis on one record, past failures, then the report.

    backdoor-lens all record/<name> [--dataset_path DIR] [--result_file_defense DIR] [--only a,b]
                                    [--select compares|blended_demo] [--no_report] [--processes]
    backdoor-lens all record/<name> --compare_defense record/<name>/defense/<method>

The analyses run one after another in this process, each with its declared demo arguments, as its
command line would run it, sharing what does not change between them: the record and defense as
loaded, the clean data as read, every image decoded once, and the forward passes of `stats.passes`
(one pass per split feeds tac, na, fm, act, actdist, fv, t-SNE, UMAP, metric, cm and detect). Each
analysis still builds its own models from the weights, so nothing one does to its model reaches the
next, and its numbers are those of a run alone. A failing analysis is reported and the others go on;
the run ends with a summary and exit 1 when any failed.

--compare_defense DIR then runs, in the same process, the analyses that draw attack and defense
side by side (declared `compares`) with that defense, as `--result_file_defense DIR --select
compares` would in a second command; the attack model's passes made for the first round answer
the second, and the report shows both.

--processes runs each analysis as its own process instead (`python -m backdoor_lens <name>`, under
mpirun with its declared ranks), as the scripts did before: the baseline of bench/bench_suite.py.
"""
import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .analysis import registry
from .args import build_parser, parse_args
from .context import shared_session
from .errors import UserError


def command_for(analysis, record: str, extra: list) -> list:
    base = [sys.executable, "-m", "backdoor_lens", analysis.name, "--result_file_attack", record, "--quiet"]
    base += extra + [str(a) for a in analysis.demo_args]
    beside = Path(sys.executable).parent / "mpirun"
    mpirun = shutil.which("mpirun") or (str(beside) if beside.exists() else None)
    if analysis.mpi_ranks and mpirun:
        return [mpirun, "-n", str(analysis.mpi_ranks)] + base
    return base


def in_a_process(analysis, record: str, extra: list, env: dict) -> tuple:
    """(status, last lines) of the analysis run as its own process."""
    proc = subprocess.run(command_for(analysis, record, extra), env=env, capture_output=True, text=True)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    tail = proc.stdout.strip().splitlines()[-3:] if proc.returncode == 0 else \
        (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines())[-3:]
    return status, tail


def in_this_process(analysis, record: str, extra: list) -> tuple:
    """(status, last lines) of the analysis run here, with the arguments its command line would get."""
    argv = ["--result_file_attack", record, "--quiet"] + extra + [str(a) for a in analysis.demo_args]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            parser = build_parser(analysis.add_arguments, description=analysis.title,
                                  default_split=analysis.default_split)
            analysis.run(parse_args(parser, argv))
    except UserError as error:
        return f"failed (exit {UserError.exit_code})", [f"error: {error}"]
    except SystemExit as stop:  # argparse refusing the declared arguments
        return f"failed (exit {stop.code})", printed.getvalue().strip().splitlines()[-3:]
    except Exception as error:  # one analysis's bug must not stop the others
        lines = traceback.format_exception_only(type(error), error)
        return "failed (error)", [line.rstrip() for line in lines][-3:]
    return "ok", printed.getvalue().strip().splitlines()[-3:]


def chosen(only: str | None, select: str | None) -> list:
    table = registry()
    analyses = list(table.values())
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise UserError(f"--only names unknown analyses: {', '.join(unknown)}; known: {', '.join(table)}")
        analyses = [a for a in analyses if a.name in names]
    if select == "compares":
        analyses = [a for a in analyses if a.compares]
    elif select == "blended_demo":
        analyses = [a for a in analyses if a.on_blended_demo]
    return analyses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="backdoor-lens all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record")
    parser.add_argument("--dataset_path")
    parser.add_argument("--result_file_defense")
    parser.add_argument("--only", help="comma-separated analysis names, e.g. cm,metric")
    parser.add_argument("--select", choices=("compares", "blended_demo"),
                        help="only the analyses that draw attack and defense side by side, or that the demo "
                             "also runs on its Blended record")
    parser.add_argument("--compare_defense", metavar="DIR",
                        help="after the analyses on the attack, run those that draw attack and defense side by "
                             "side (declared `compares`) with this defense, in the same process: the attack "
                             "model's passes are not made again; the report shows both")
    parser.add_argument("--no_report", action="store_true")
    parser.add_argument("--processes", action="store_true",
                        help="one process per analysis (mpirun for the landscape) instead of one shared process")
    args = parser.parse_args(argv)
    if not Path(args.record).exists():
        raise UserError(f"record {args.record} does not exist; pass a BackdoorBench record folder")
    if args.compare_defense and args.result_file_defense:
        raise UserError("give either --result_file_defense (every chosen analysis with the defense) or "
                        "--compare_defense (the attack, then the comparisons), not both")
    if args.compare_defense and not Path(args.compare_defense).exists():
        raise UserError(f"--compare_defense {args.compare_defense} does not exist; pass a BackdoorBench defense "
                        f"folder (the one holding defense_result.pt)")
    extra = []
    if args.dataset_path:
        extra += ["--dataset_path", args.dataset_path]
    if args.result_file_defense:
        extra += ["--result_file_defense", args.result_file_defense]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    runs = [(analysis, extra, "") for analysis in chosen(args.only, args.select)]
    if args.compare_defense:
        runs += [(analysis, extra + ["--result_file_defense", args.compare_defense], " (attack vs defense)")
                 for analysis in chosen(args.only, "compares")]
    results = []
    os.environ.setdefault("MPLBACKEND", "Agg")
    with shared_session() as session:
        for analysis, flags, side_by_side in runs:
            print(f"==> {analysis.name}{side_by_side}: {analysis.title}", flush=True)
            started = time.time()
            if args.processes:
                status, tail = in_a_process(analysis, args.record, flags, env)
            else:
                status, tail = in_this_process(analysis, args.record, flags)
            for line in tail:
                print(f"    {line}")
            print(f"    {status} in {time.time() - started:.1f} s", flush=True)
            results.append((analysis.name + side_by_side, status))
        if not args.processes:
            print(f"\nshared forward passes: {session.passes.passes_run} computed, "
                  f"{session.passes.passes_saved} more requests answered from them")
    ok = sum(1 for _, s in results if s == "ok")
    where = Path(args.result_file_defense) if args.result_file_defense else Path(args.record)
    where = where.parent if where.suffix == ".pt" else where
    print(f"\n{ok} of {len(results)} analyses ran; outputs under {where.resolve() / 'visual'}")
    for name, status in results:
        if status != "ok":
            print(f"  FAILED {name}: {status}")
    if not args.no_report:
        from .report.build import build_report

        print(f"report: {build_report(Path(args.record), defense=args.result_file_defense or args.compare_defense)}")
    return 0 if ok == len(results) else 1
