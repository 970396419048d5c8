"""The suite in one process against one process per analysis, measured in this one run.

    .venv/bin/python bench/bench_suite.py [--record record/badnet_demo] [--only tac,na,...]

Runs `python -m backdoor_lens all <record> --no_report --processes` (each analysis its own
process, the landscape under mpirun when present: how the scripts ran before) and then
`python -m backdoor_lens all <record> --no_report` (every analysis in one process, the record,
the images and the shared forward passes loaded once), each on its own fresh copy of the record
(without its visual/ folder) in a temporary folder. Prints each analysis's seconds both ways (its
"ok in X s" line), checks that the two runs' numbers agree (every analysis's summary.json, numbers
equal to 1e-6 relative, strings equal once each copy's folder is written <record>; keys naming
seconds, ranks or threads per rank are skipped) and ends with

    identical_numbers yes|no
    ratio suite_vs_processes <seconds with --processes / seconds in one process>

(the whole commands' wall time, start-up included). --record synthetic takes the synthetic
CIFAR-10-sized record of bench/synthetic_cifar.py (built when missing).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO = ROOT / "record" / "badnet_demo"
REL_TOL = 1e-6
# Keys that say how a run was laid out or how long it took, not what it computed: the landscape
# runs under mpirun with its declared ranks (one thread each) with --processes, in one process with
# every thread in the suite.
SKIPPED_KEYS = ("seconds", "ranks", "threads_per_rank")
STARTED = re.compile(r"^==> (\S+): ")
FINISHED = re.compile(r"^\s+(ok|failed.*) in ([0-9.]+) s$")


def copy_record(record: Path, into: Path) -> Path:
    """A copy of the record at into/record/<name> (BackdoorBench's layout), without its outputs."""
    target = into / "record" / record.name
    shutil.copytree(record, target, ignore=lambda folder, names: ["visual"] if Path(folder) == record else [])
    return target


def dataset_path(record: Path) -> str | None:
    """The record's clean data folder, which a copy elsewhere no longer finds beside it (None: the
    data ship with the package, as the demo's digits do)."""
    from backdoor_lens.record.record import load_record

    root = load_record(str(record)).dataset_root(None)
    return None if root is None else str(Path(root).resolve())


def run_all(record: Path, processes: bool, data: str | None, only: str | None) -> tuple:
    """(wall seconds, {analysis: (status, seconds)}, output) of one `backdoor_lens all` command."""
    command = [sys.executable, "-m", "backdoor_lens", "all", str(record), "--no_report"]
    command += ["--processes"] if processes else []
    command += ["--dataset_path", data] if data else []
    command += ["--only", only] if only else []
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return seconds, parse_times(proc.stdout), proc.stdout + proc.stderr


def parse_times(output: str) -> dict:
    """{analysis: (status, seconds)} from the "==> name:" and "ok in X s" lines of `all`."""
    times, current = {}, None
    for line in output.splitlines():
        if (started := STARTED.match(line)):
            current = started.group(1)
        elif current and (finished := FINISHED.match(line)):
            times[current] = (finished.group(1), float(finished.group(2)))
            current = None
    return times


def differences(a, b, where: str = "") -> list:
    """Where two JSON values differ: numbers beyond REL_TOL relative, anything else unequal.
    Keys naming timings or the process layout (SKIPPED_KEYS) are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            if any(word in str(key) for word in SKIPPED_KEYS):
                continue
            if key not in a or key not in b:
                found.append(f"{where}/{key}: only in {'the suite' if key in a else 'the processes'} run")
            else:
                found += differences(a[key], b[key], f"{where}/{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for k, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{k}]")]
    if isinstance(a, bool) or isinstance(b, bool):
        return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} against {b!r}"]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        if (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0):
            return []
        return [f"{where}: {a!r} against {b!r}"]
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def _normalized(value, roots: list):
    """The value with each copy's folder written <record>, so that paths in both runs compare equal."""
    if isinstance(value, dict):
        return {k: _normalized(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalized(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<record>")
    return value


def compare_outputs(suite_record: Path, processes_record: Path) -> list:
    """Differences between the two runs' summary.json files, analysis by analysis."""
    found = []
    suite_dir, processes_dir = suite_record / "visual", processes_record / "visual"
    names = sorted({p.parent.name for d in (suite_dir, processes_dir) for p in d.glob("*/summary.json")})
    roots = [str(suite_record.resolve()), str(processes_record.resolve()), str(suite_record), str(processes_record)]
    for name in names:
        files = [d / name / "summary.json" for d in (suite_dir, processes_dir)]
        missing = [label for label, f in zip(("suite", "processes"), files) if not f.is_file()]
        if missing:
            found.append(f"{name}: no summary.json in the {missing[0]} run")
            continue
        one, other = (_normalized(json.loads(f.read_text()), roots) for f in files)
        found += [f"{name}{d}" for d in differences(one, other)]
    return found


def resolve_record(text: str) -> Path:
    if text == "synthetic":
        from bench.synthetic_cifar import DEFAULT_OUT, build

        build(DEFAULT_OUT)
        return DEFAULT_OUT
    path = Path(text).expanduser().resolve()
    if not (path / "attack_result.pt").is_file():
        raise SystemExit(f"--record {text}: no attack_result.pt there; build the demo (python -m demo.build_demo) "
                         f"or pass a record folder")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", default=str(DEMO), help="a record folder, or synthetic")
    parser.add_argument("--only", help="comma-separated analyses (default: all of them)")
    parser.add_argument("--keep", action="store_true", help="keep the two output trees (their folder is printed)")
    args = parser.parse_args(argv)
    record = resolve_record(args.record)
    data = dataset_path(record)
    work = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    try:
        # Both copies before either run, so that both runs read the same record even when the
        # original is rebuilt meanwhile (make demo).
        copies = {label: copy_record(record, work / label) for label in ("processes", "suite")}
        runs = {}
        # The baseline first: whatever the machine's caches give the later run goes to the suite's side.
        for label, processes in (("processes", True), ("suite", False)):
            copy = copies[label]
            seconds, times, output = run_all(copy, processes, data, args.only)
            runs[label] = (copy, seconds, times, output)
            print(f"{label}: {seconds:.1f} s for {len(times)} analyses", flush=True)
        (suite_copy, suite_s, suite_t, suite_out), (proc_copy, proc_s, proc_t, _) = runs["suite"], runs["processes"]
        print(f"{'analysis':<12} {'suite s':>9} {'processes s':>12}")
        for name in list(dict.fromkeys(list(proc_t) + list(suite_t))):
            cells = []
            for times in (suite_t, proc_t):
                status, seconds = times.get(name, ("missing", float("nan")))
                cells.append(f"{seconds:.1f}" + ("" if status == "ok" else f" ({status})"))
            print(f"{name:<12} {cells[0]:>9} {cells[1]:>12}")
        print(f"{'sum':<12} {sum(s for _, s in suite_t.values()):>9.1f} {sum(s for _, s in proc_t.values()):>12.1f}")
        failed = [f"{label} {name}" for label, times in (("suite", suite_t), ("processes", proc_t))
                  for name, (status, _) in times.items() if status != "ok"]
        if failed:
            print("failed: " + ", ".join(failed))
        if not suite_t:
            print(suite_out[-3000:])
        found = compare_outputs(suite_copy, proc_copy)
        for line in found:
            print(f"  differs: {line}")
        print(f"identical_numbers {'no' if found else 'yes'}")
        print(f"ratio suite_vs_processes {proc_s / suite_s:.2f}")
        if args.keep:
            print(f"outputs kept in {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
