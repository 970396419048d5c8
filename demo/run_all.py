"""Run every visual_*.py on one record, continue past failures, summarise, build the report.

    python -m demo.run_all [record/<name>] [--dataset_path DIR] [--result_file_defense DIR] [--only a,b]

Each script declares the arguments of its demo run in a module-level `DEMO_ARGS` list (read
with `ast`, without importing the script) and, for MPI, `DEMO_MPI_RANKS`.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.script_info import declared_constant

ROOT = Path(__file__).resolve().parent.parent


def command_for(script: Path, record: str, extra: list) -> list:
    ranks = declared_constant(script, "DEMO_MPI_RANKS", 0)
    base = [sys.executable, str(script), "--result_file_attack", record, "--quiet"] + extra
    base += [str(a) for a in declared_constant(script, "DEMO_ARGS", [])]
    mpirun = shutil.which("mpirun") or (str(Path(sys.executable).parent / "mpirun")
                                        if (Path(sys.executable).parent / "mpirun").exists() else None)
    if ranks and mpirun:
        return [mpirun, "-n", str(ranks)] + base
    return base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", nargs="?", default=str(ROOT / "record" / "badnet_demo"))
    parser.add_argument("--dataset_path")
    parser.add_argument("--result_file_defense")
    parser.add_argument("--only", help="comma-separated method names, e.g. cm,metric")
    parser.add_argument("--no_report", action="store_true")
    args = parser.parse_args(argv)
    extra = []
    if args.dataset_path:
        extra += ["--dataset_path", args.dataset_path]
    if args.result_file_defense:
        extra += ["--result_file_defense", args.result_file_defense]
    scripts = sorted(ROOT.glob("visual_*.py"))
    if args.only:
        wanted = {f"visual_{n.strip()}.py" for n in args.only.split(",")}
        scripts = [s for s in scripts if s.name in wanted]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    results = []
    for script in scripts:
        cmd = command_for(script, args.record, extra)
        print(f"==> {script.name}", flush=True)
        started = time.time()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.time() - started
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = proc.stdout.strip().splitlines()[-3:] if proc.returncode == 0 else \
            (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines())[-3:]
        for line in tail:
            print(f"    {line}")
        print(f"    {status} in {seconds:.0f} s", flush=True)
        results.append((script.name, status, seconds))
    ok = sum(1 for _, s, _ in results if s == "ok")
    where = Path(args.result_file_defense) if args.result_file_defense else Path(args.record)
    where = where.parent if where.suffix == ".pt" else where
    print(f"\n{ok} of {len(results)} analyses ran; outputs under {where.resolve() / 'visual'}")
    for name, status, seconds in results:
        if status != "ok":
            print(f"  FAILED {name}: {status}")
    if not args.no_report:
        try:
            from report.build_report import build_report
            page = build_report(Path(args.record), defense=args.result_file_defense)
            print(f"report: {page}")
        except ImportError:
            print("report: not available yet")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
