"""Each feature analysis against the plain forward passes it needs, measured in this one process.

For tac, na, act and actdist (default arguments):
- the analysis as its command line runs it (`Analysis.run`, --quiet, outputs to a temporary folder),
  from a fresh start: the record loaded, the clean data read and every image decoded again, the
  figures drawn; no session shared with the other analyses (only the imports are already done);
- the plain forward passes the analysis needs, over the same images already in memory as float
  tensors on the device, in the same batches (--batch_size 128), under torch.inference_mode:
    tac, na    one pass over the N poisoned samples and their N clean twins (2N images), each
               batch of 128 poisoned samples forwarded with its 128 twins, as the analyses do;
    act        one pass over its split (plus a ranking pass over the poisoned samples and their
               twins with --neuron_order tac or difference, not the default);
    actdist    one pass over its split.
`ratio <name>_vs_plain_passes` is the analysis's seconds over the plain passes' seconds: 1.0 would
mean the analysis costs exactly the model's forward passes.

`rate loader_images_per_s`: the data path alone, the largest split (bd_train) of the record
iterated through `ctx.loader` (uint8 images gathered, converted and normalised on the device)
without the model, once decoded (the first iteration decodes; the fastest of the next three counts).

Records: the demo record (record/badnet_demo) and a synthetic CIFAR-10-sized record that
bench/synthetic_cifar.py builds and caches (figures prefixed cifar_); --record picks one, or a
path to any record folder (figures prefixed by its folder name).

    .venv/bin/python bench/bench_pipeline.py [--record demo|synthetic|both|PATH] [--n_sub N] [--repeat R]
                                             [--analyses tac,na,act,actdist]

On 2 CPU cores the full synthetic record takes long (act and actdist pass over 50,000 images,
twice each): --n_sub caps the analysed samples (the loader rate always uses all of bd_train).
"""
import argparse
import contextlib
import gc
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backdoor_lens.analysis import get  # noqa: E402
from backdoor_lens.args import build_parser, parse_args  # noqa: E402
from backdoor_lens.context import load_context  # noqa: E402
from backdoor_lens.record import datasets  # noqa: E402
from backdoor_lens.stats.activations import TWIN_ORDERS  # noqa: E402

ANALYSES = ("tac", "na", "act", "actdist")
DEMO = ROOT / "record" / "badnet_demo"
# Full iterations of the decoded split timed for the loader rate, the fastest kept: one iteration of
# the demo's 1,437 images lasts a tenth of a second, less than one scheduling hiccup of a busy machine.
TIMED_ITERATIONS = 3


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def analysis_args(name: str, record: Path, output_dir: str, extra: list):
    """The arguments the analysis's command line would get: default arguments plus `extra`."""
    analysis = get(name)
    parser = build_parser(analysis.add_arguments, description=analysis.title, default_split=analysis.default_split)
    return parse_args(parser, ["--result_file_attack", str(record), "--quiet", "--output_dir", output_dir] + extra)


def time_analysis(name: str, record: Path, extra: list) -> float:
    """Seconds of one run of the analysis as its command line would run it, from a fresh start."""
    with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{name}-") as output_dir:
        args = analysis_args(name, record, output_dir, extra)
        # The clean datasets are cached per process by their reader; a command line reads them anew.
        datasets._CACHE.clear()
        gc.collect()
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            get(name).run(args)
        synchronize(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        return time.perf_counter() - started


def needed_passes(name: str, ctx, args) -> list:
    """The analysis's passes: each a list of splits whose batches are forwarded together (a
    poisoned batch with its clean twins' batch, as compare_twins and rank_channels forward them)."""
    if name in ("tac", "na"):
        poisoned = ctx.poisoned_split(ctx.split_name(), name)
        return [[poisoned, poisoned.clean_twin()]]
    split = ctx.use_split()
    if name == "act" and args.neuron_order in TWIN_ORDERS:
        poisoned = split.only_poisoned()
        return [[poisoned, poisoned.clean_twin()], [split]]
    return [[split]]


def plain_batches(passes: list, batch_size: int, device) -> list:
    """The model inputs of every forward the analysis makes, float tensors already on the device."""
    batches = []
    for splits in passes:
        inputs = [split.batch(np.arange(len(split)))[0].to(device) for split in splits]
        batches += [torch.cat([x[start:start + batch_size] for x in inputs])
                    for start in range(0, len(inputs[0]), batch_size)]
    return batches


def time_plain_passes(name: str, record: Path, extra: list) -> tuple:
    """(seconds, images) of the forward passes the analysis needs, over its images held on the device."""
    with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{name}-plain-") as output_dir:
        args = analysis_args(name, record, output_dir, extra)
        with load_context(args, name, split=None) as ctx:
            batches = plain_batches(needed_passes(name, ctx, args), args.batch_size, ctx.device)
            model, device = ctx.model, ctx.device
            ctx.out.discard()
    with torch.inference_mode():
        model(batches[0])  # warm-up: first-call allocations and kernel choice do not count
        synchronize(device)
        started = time.perf_counter()
        for x in batches:
            model(x)
        synchronize(device)
        seconds = time.perf_counter() - started
    return seconds, sum(len(x) for x in batches)


def loader_rate(record: Path) -> tuple:
    """(images per second, images) of ctx.loader over the record's bd_train, already decoded, no model."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-loader-") as output_dir:
        args = analysis_args("actdist", record, output_dir, [])
        with load_context(args, "bench_loader", split=None) as ctx:
            split = ctx.get_split("bd_train" if ctx.record.bd_train is not None else "clean_train")
            loader = ctx.loader(split)
            for _ in loader:  # decodes the split once (and on CUDA copies it to the device)
                pass
            synchronize(ctx.device)
            seconds = float("inf")
            for _ in range(TIMED_ITERATIONS):
                started = time.perf_counter()
                for batch in loader:
                    pass
                synchronize(ctx.device)
                seconds = min(seconds, time.perf_counter() - started)
            ctx.out.discard()
    return len(split) / seconds, len(split)


def warm_up(record: Path, analyses=ANALYSES) -> None:
    """Imports (matplotlib and the analyses' modules) and the device's first-use costs, paid once
    before anything is timed: a process pays them once, whatever it runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    for name in analyses:
        get(name)
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda").sum().item()


def best_of(repeat: int, measure):
    results = [measure() for _ in range(repeat)]
    return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


def planned_images(record: Path, extra: list, analyses=ANALYSES) -> int:
    """How many images the four analyses and their plain passes forward in all (split sizes only,
    nothing decoded): said up front, since on a CPU the full synthetic record takes over an hour."""
    total = 0
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-plan-") as output_dir:
        for name in analyses:
            args = analysis_args(name, record, output_dir, extra)
            with load_context(args, name, split=None) as ctx:
                total += 2 * sum(len(split) for splits in needed_passes(name, ctx, args) for split in splits)
                ctx.out.discard()
    return total


def measure_record(label: str, record: Path, extra: list, repeat: int, analyses=ANALYSES) -> list:
    """[(figure line)] for one record; prints the details as it goes."""
    prefix = "" if label == "demo" else f"{label}_"
    warm_up(record, analyses)
    planned = planned_images(record, extra, analyses) * repeat
    cpu = not torch.cuda.is_available()
    print(f"  {label}: {planned} images through the model in all"
          + ("; on a CPU (about 50 images/s on 2 cores) --n_sub 2000 shortens a large record's run"
             if cpu and planned > 50_000 else ""), flush=True)
    lines = []
    for name in analyses:
        analysis = best_of(repeat, lambda: time_analysis(name, record, extra))
        plain, images = best_of(repeat, lambda: time_plain_passes(name, record, extra))
        print(f"  {label} {name}: analysis {analysis:.2f} s, plain passes {plain:.2f} s over {images} images "
              f"({images / plain:.0f} images/s)", flush=True)
        lines.append(f"ratio {prefix}{name}_vs_plain_passes {analysis / plain:.2f}")
        gc.collect()
    rate, images = loader_rate(record)
    print(f"  {label} loader: {images} images of the largest split, {rate:.0f} images/s", flush=True)
    lines.append(f"rate {prefix}loader_images_per_s {rate:.0f}")
    return lines


def synthetic_record() -> Path:
    from bench.synthetic_cifar import DEFAULT_OUT, build

    build(DEFAULT_OUT)
    return DEFAULT_OUT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", default="both", help="demo, synthetic, both, or a record folder")
    parser.add_argument("--n_sub", type=int, help="cap the analysed samples (passed to every analysis)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each figure R times, keep the fastest")
    parser.add_argument("--analyses", default=",".join(ANALYSES),
                        help="comma-separated, from: " + ", ".join(ANALYSES) + " (a 2-core CPU passes over the "
                             "synthetic record's 50,000 images at default arguments in 4 to 6 minutes a pass)")
    args = parser.parse_args(argv)
    analyses = [name.strip() for name in args.analyses.split(",") if name.strip()]
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown or not analyses:
        parser.error(f"--analyses: choose from {', '.join(ANALYSES)}"
                     + (f" (not {', '.join(unknown)})" if unknown else ""))
    if args.n_sub is not None and args.n_sub < 1:
        parser.error("--n_sub must be at least 1")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    extra = ["--n_sub", str(args.n_sub)] if args.n_sub else []
    records = []
    if args.record in ("demo", "both"):
        if not (DEMO / "attack_result.pt").is_file():
            print(f"demo record {DEMO} not found; build it with `python -m demo.build_demo`", file=sys.stderr)
            return 1
        records.append(("demo", DEMO))
    if args.record in ("synthetic", "both"):
        records.append(("cifar", synthetic_record()))
    if not records:
        path = Path(args.record)
        if not (path / "attack_result.pt").is_file():
            parser.error(f"--record {args.record}: neither demo, synthetic, both nor a record folder")
        records.append((path.name, path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {torch.get_num_threads()} threads"
          + (f", --n_sub {args.n_sub}" if args.n_sub else ", default arguments"), flush=True)
    lines = []
    for label, record in records:
        lines += measure_record(label, record, extra, args.repeat, analyses)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
