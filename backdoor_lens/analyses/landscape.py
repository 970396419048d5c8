"""Loss landscape: loss and accuracy of the model around its weights along one or two directions.

After Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018): grid point (a, b)
is the model with weights w + a*dx + b*dy, where dx, dy are Gaussian directions rescaled filter by
filter to the norms of the weights' own filters (biases and BatchNorm fixed), or dx = w_defense -
w_attack with --direction_to defense (a = 0 is the backdoored model, a = 1 the repaired one).
Loss is the mean cross-entropy on a fixed stratified subset of the split (--n_sub), BatchNorm in
eval mode. Points are spread over MPI ranks and saved in a resumable HDF5 store:

    mpirun -n 4 python visual_landscape.py --result_file_attack record/<name> --x=-1:1:51 --y=-1:1:51

Defaults sized for the device: a GPU evaluates 51 points (--x=-1:1:51) on 1000 samples per split;
a CPU, left to those, would need 51,000 forward passes of 32x32 images, 7 to 13 minutes for a
PreAct-ResNet-18 on 2 cores, so there 21 points on 500 samples (about 1.5 to 3 minutes); the run
says so up front, and --x / --n_sub given on the command line are used as given (DEVICE_DEFAULTS).
One grid point per pass unless --points_per_pass says otherwise: evaluating several at once through
torch.vmap measured slower than a loop on an H200 (1.72x at 4 or 16 points per pass) and on 2 CPU
cores (1.53x at 4); bench/bench_landscape.py measures it for another machine and model.

A run stopped for any reason keeps the points it saved; the same command again computes only the
missing ones. A point whose loss is NaN or infinite (weights that leave the network undefined, e.g.
a BatchNorm variance moved below zero) is a result: drawn and counted as diverged, never recomputed.
One run at a time per store: a second one is refused while the first holds the store's lock.

Runs under mpirun, so it keeps its own run(args) (the MPI schedule) instead of compute/write: every
rank loads the context and evaluates its share of the grid; rank 0 alone holds the store (lock,
resume, saves) and writes the outputs, through write(result, ctx). The math, the schedule and the
store are in backdoor_lens/landscape/, the figures in backdoor_lens/plot/landscape.py.
"""
import functools
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.context import load_context
from backdoor_lens.device import fill_device_defaults
from backdoor_lens.errors import UserError
from backdoor_lens.landscape.directions import DIR_TYPES, IGNORES, NORMS, DirectionSettings, base_entries
from backdoor_lens.landscape.evaluate import GridEvaluator, load_batches
from backdoor_lens.landscape.results import SAMPLE_HEADER, grid_header, grid_rows, sample_rows, summarise
from backdoor_lens.landscape.schedule import evaluate_grid, get_comm, rank_device, root_decides, share_cpu_threads
from backdoor_lens.landscape.store import LandscapeStore, held_store, landscape_settings
from backdoor_lens.output import check_writable_location, make_folders, remove_empty, writable
from backdoor_lens.plot.landscape import landscape_figures, split_title
from backdoor_lens.record.splits import SPLITS, first_available

# The cost flags a run leaves unset, by device (see the module docstring): on a GPU 1000 samples,
# so that even a 51 x 51 grid (2.6 million image evaluations) takes minutes; on a CPU 21 x 500.
DEVICE_DEFAULTS = {"gpu": {"x": "-1:1:51", "n_sub": 1000}, "cpu": {"x": "-1:1:21", "n_sub": 500}}


def add_arguments(parser):
    for action in parser._actions:
        if action.dest == "n_sub":
            action.default = None  # by device: DEVICE_DEFAULTS
            action.help = ("evaluate every grid point on a fixed stratified subset of this many samples per split "
                           "(default 1000 on a GPU, which keeps a 51x51 grid to minutes; 500 on a CPU)")
        elif action.dest == "visual_dataset":
            action.help = ("split(s), comma-separated, e.g. clean_train,bd_train for clean and poisoned side "
                           "by side; a poisoned split the record lacks falls back to its clean one")
    group = parser.add_argument_group("loss landscape")
    group.add_argument("--x", default=None, help="grid along the first direction, min:max:points (write "
                                                   "--x=-1:1:51, with '='); default -1:1:51 on a GPU, -1:1:21 on a CPU")
    group.add_argument("--y", default=None, help="grid along the second direction, min:max:points; "
                                                  "omitted: a 1-D curve")
    group.add_argument("--dir_type", choices=DIR_TYPES, default=None,
                       help="move the parameters (weights) or the whole state_dict incl. BatchNorm statistics "
                            "(states); default weights, states with --direction_to")
    group.add_argument("--xnorm", choices=NORMS, default="filter", help="normalisation of the x direction")
    group.add_argument("--ynorm", choices=NORMS, default="filter", help="normalisation of the y direction")
    group.add_argument("--xignore", choices=IGNORES, default="biasbn",
                       help="biasbn: biases and BatchNorm stay fixed along x; none: they move along themselves")
    group.add_argument("--yignore", choices=IGNORES, default="biasbn", help="the same for y")
    group.add_argument("--same_dir", action="store_true", help="use the x direction for y too")
    group.add_argument("--direction_to", choices=("defense",),
                       help="x direction = defense model - attack model, centred on the attack model "
                            "(needs --result_file_defense)")
    group.add_argument("--surf_file", help="the resumable HDF5 store (default: landscape.h5 in the output folder); "
                                           "inside the record folder only under its visual/")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a landscape store that holds other settings (a store with the same settings "
                            "is still resumed; a file that is not a landscape store is never replaced)")
    group.add_argument("--points_per_pass", type=int, default=1,
                       help="grid points evaluated together per batch (batched weights via torch.vmap); default 1: "
                            "batching measured slower on an H200 (1.72x at 4 or 16) and on 2 CPU cores (1.53x at 4); "
                            "bench/bench_landscape.py measures it on yours (0 is read as 1)")
    group.add_argument("--max_points", type=int, default=None,
                       help="stop after computing this many new points (the rest on a later run)")
    group.add_argument("--save_every", type=float, default=60.0, help="seconds between saves of the store")


@dataclass(frozen=True)
class Settings:
    x: tuple  # grid values along the first direction
    y: tuple | None  # along the second; None: a 1-D curve
    splits: str  # --visual_dataset: split names, comma-separated
    directions: DirectionSettings
    surf_file: str | None
    overwrite: bool
    points_per_pass: int
    max_points: int | None
    save_every: float
    device_defaults: dict  # the cost flags left unset, with the values the device rule gave them
    device_kind: str  # "cpu" or "gpu": whose defaults apply


def parse_axis(text: str, flag: str) -> np.ndarray:
    """'min:max:num' -> num evenly spaced values from min to max (both included)."""
    parts = str(text).split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        low, high, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise UserError(f"{flag} {text!r} is not min:max:points (e.g. {flag}=-1:1:51)") from None
    if num < 1 or not np.isfinite([low, high]).all():
        raise UserError(f"{flag} {text!r} needs finite bounds and at least 1 point")
    if num > 1 and not low < high:
        raise UserError(f"{flag} {text!r}: min must be below max")
    return np.linspace(low, high, num)


def device_note(filled: dict, kind: str) -> str | None:
    """The line printed up front when a CPU's lighter defaults apply."""
    if kind != "cpu" or not filled:
        return None
    shown = lambda flag, value: f"--x={value}" if flag == "x" else f"--{flag} {value}"  # noqa: E731
    gpu = DEVICE_DEFAULTS["gpu"]
    return (f"on a CPU: {', '.join(shown(k, v) for k, v in filled.items())} (on a GPU "
            f"{', '.join(shown(k, gpu[k]) for k in filled)}); set {' / '.join('--' + k for k in filled)} "
            f"for another grid or sample count")


def settings(args) -> Settings:
    filled, kind = fill_device_defaults(args, DEVICE_DEFAULTS)
    x = parse_axis(args.x, "--x")
    y = parse_axis(args.y, "--y") if args.y not in (None, "") else None
    if args.points_per_pass < 0:
        raise UserError("--points_per_pass must be 1 or more (0 is read as 1)")
    if args.max_points is not None and args.max_points < 1:
        raise UserError("--max_points must be at least 1")
    if args.save_every < 0:
        raise UserError("--save_every must not be negative")
    if args.same_dir and y is None:
        raise UserError("--same_dir needs a 2-D grid; give --y too")
    if args.direction_to and not args.result_file_defense:
        raise UserError("--direction_to defense needs the defense model; pass --result_file_defense")
    directions = DirectionSettings(
        dir_type=args.dir_type or ("states" if args.direction_to else "weights"), xnorm=args.xnorm, ynorm=args.ynorm,
        xignore=args.xignore, yignore=args.yignore, same_dir=args.same_dir, seed=args.seed,
        to_second_model=args.direction_to)
    return Settings(tuple(x.tolist()), None if y is None else tuple(y.tolist()), args.visual_dataset, directions,
                    args.surf_file, args.overwrite, max(1, args.points_per_pass), args.max_points, args.save_every,
                    filled, kind)


# A poisoned split the record lacks falls back to the clean split of the same data.
CLEAN_FALLBACK = {"bd_train": "clean_train", "subset": "clean_train", "bd_test": "clean_test", "mixed": "clean_test"}


def resolve_splits(text: str, record) -> tuple:
    """The split names asked for, a poisoned one the record lacks replaced by its clean one."""
    names, notes = [], []
    for name in (part.strip() for part in str(text).split(",")):
        if not name:
            continue
        if name not in SPLITS:
            raise UserError(f"unknown --visual_dataset {name!r}; choose one of {', '.join(SPLITS)}")
        chosen = first_available(record, (name, CLEAN_FALLBACK.get(name, name)))
        if chosen != name:
            kind = "training" if chosen == "clean_train" else "test"
            notes.append(f"this record has no poisoned {kind} set; using {chosen} instead of {name}")
        if chosen not in names:
            names.append(chosen)
    if not names:
        raise UserError("--visual_dataset names no split; e.g. --visual_dataset bd_train")
    return names, notes


def surf_path(surf_file: str | None, ctx) -> Path:
    """The store's path, refused (one line) where the landscape must not or cannot write."""
    if not surf_file:
        return ctx.out.final / "landscape.h5"
    surf = Path(surf_file).expanduser()
    if surf.is_dir():
        raise UserError(f"--surf_file {surf} is a folder; pass --surf_file a file in it, e.g. {surf / 'landscape.h5'}")
    resolved = surf.resolve()
    owners = [Path(ctx.record.path).resolve()] + ([Path(ctx.defense.path).resolve()] if ctx.defense else [])
    inside = [owner for owner in owners if resolved.is_relative_to(owner)]
    if inside and not any(resolved.is_relative_to(owner / "visual") for owner in inside):
        visual = inside[-1] / "visual"
        raise UserError(f"--surf_file {surf} is inside the record folder {inside[-1]}, which the landscape writes "
                        f"only under {visual}; pass a path there or outside the record")
    hint = "pass --surf_file in a folder you can write to"
    if surf.exists() and not writable(surf.parent):
        raise UserError(f"--surf_file {surf}: its folder {surf.parent} is not writable (read-only); {hint}")
    check_writable_location(surf, "--surf_file", hint)
    return surf


@dataclass
class LandscapeResult:
    store: LandscapeStore  # the grids (rank 0's, saved)
    splits: dict  # {name: Split} evaluated at every point
    centre_label: str  # the model at a = b = 0
    directions: DirectionSettings
    computed: int  # points computed by this run
    seconds: float  # wall seconds of the grid evaluation, all ranks together
    ranks: int
    points_per_pass: int
    threads: int  # CPU threads per rank
    note: str | None  # the evaluator's note (batching fell back to the loop)
    device_defaults: dict = None  # Settings.device_defaults


def make_evaluator(ctx, centre, base, dx, dy, data, points_per_pass: int) -> GridEvaluator:
    """The evaluator of every rank, all with the same points per pass (the ranks must cut the same chunks)."""
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape for thousands of passes
    return GridEvaluator(centre, base, dx, dy, data, ctx.device, points_per_pass=points_per_pass)


def run(args) -> dict:
    comm = get_comm()
    args.device = rank_device(comm, args.device)  # one GPU per rank, before the context picks the device
    threads = share_cpu_threads(comm)
    chosen = settings(args)
    note = device_note(chosen.device_defaults, chosen.device_kind)
    if note and comm.rank == 0:
        print(note, flush=True)
    x, y = np.asarray(chosen.x), None if chosen.y is None else np.asarray(chosen.y)
    with load_context(args, "landscape", split=None) as ctx, ExitStack() as hold:
        names, notes = resolve_splits(chosen.splits, ctx.record)
        for note in notes if comm.rank == 0 else ():
            print(f"note: {note}")
        splits = {name: ctx.use_split(name) for name in names}
        ctx.split = splits[names[0]]
        directions = chosen.directions
        centre_label = "attack" if directions.to_second_model else ctx.model_label
        centre = ctx.models[centre_label]
        base = base_entries(centre, directions.dir_type)
        target = base_entries(ctx.models["defense"], directions.dir_type) if directions.to_second_model else None
        identity = landscape_settings(base, target, directions, x, y, splits)
        surf = surf_path(chosen.surf_file, ctx)
        # The data first: a split that cannot be read must not leave an empty store behind.
        data = {name: load_batches(ctx.loader(split), ctx.device, desc=f"load {name}") for name, split in splits.items()}

        def claim():  # rank 0 alone reads and writes the store, and holds its lock for the whole run
            final = ctx.out.final.resolve()
            if surf.resolve().is_relative_to(final):  # carried into the output folder that replaces it
                ctx.out.keep(str(surf.resolve().relative_to(final)))
            else:
                hold.callback(remove_empty, make_folders(surf.parent))
            make = functools.partial(directions.make, base, y is not None, target)
            store, dx, dy = hold.enter_context(held_store(surf, identity, x, y, names, make, chosen.overwrite))
            todo = store.missing()
            return store, (dx, dy, todo[:chosen.max_points] if chosen.max_points else todo)

        store, (dx, dy, todo) = root_decides(comm, claim)
        evaluator = make_evaluator(ctx, centre, base, dx, dy, data, chosen.points_per_pass)
        started = time.perf_counter()
        try:
            computed = evaluate_grid(comm, evaluator, store, todo, x, y, chosen.save_every)
        except KeyboardInterrupt:
            if comm.rank == 0:
                print(f"interrupted: {store.done()} of {store.size} points are saved in {store.path}; "
                      f"the same command resumes")
            raise
        if comm.rank != 0:
            return {}  # rank 0 writes every output
        result = LandscapeResult(store, splits, centre_label, directions, computed, time.perf_counter() - started,
                                 comm.size, evaluator.points_per_pass, threads, evaluator.note, chosen.device_defaults)
        return ctx.finish(write(result, ctx))


def write(result: LandscapeResult, ctx) -> dict:
    """Figures, the grid and sample tables, summary.json; the per-split lines printed."""
    if result.note:
        print(f"note: {result.note}")
    store, splits, towards = result.store, result.splits, result.directions.to_second_model
    kind = "direction to the defense model" if towards else f"{result.directions.xnorm}-normalised random directions"
    title = (f"Loss landscape of {ctx.record.name} around the {result.centre_label} model ({kind}; "
             f"{', '.join(f'{len(s)} {n}' for n, s in splits.items())} samples)")
    figures = landscape_figures(store.x, store.y, store.loss, store.accuracy, store.computed, title, towards,
                                result.centre_label)
    for name, figure in figures.items():
        ctx.out.save_figure(figure, name)
    ctx.out.save_csv("landscape_grid", grid_rows(store), header=grid_header(store))
    ctx.out.save_csv("landscape_samples", sample_rows(splits), header=SAMPLE_HEADER)
    done, diverged, computed, seconds = store.done(), store.diverged(), result.computed, result.seconds
    per_split = summarise(store, splits, towards)
    summary = {
        "dims": 1 if store.y is None else 2, "grid": list(store.shape), "points_total": store.size,
        "points_computed": done, "points_diverged": diverged, "points_this_run": int(computed),
        "complete": done == store.size,
        "eval_seconds": round(seconds, 3),
        "seconds_per_point": round(seconds / computed, 5) if computed else None,  # wall, all ranks together
        "ranks": result.ranks, "points_per_pass": result.points_per_pass, "threads_per_rank": result.threads,
        "dir_type": result.directions.dir_type, "direction_to": towards, "store": str(store.path),
        "device_defaults": result.device_defaults or {},
        "splits": per_split,
    }
    ctx.out.save_json("summary", summary)
    for split, entry in per_split.items():
        centre = entry["center_loss"]
        centre_text = "not computed" if centre is None else "diverged" if not np.isfinite(centre) else \
            f"{centre:.4f} (accuracy {entry['center_accuracy']:.4f})"
        extra = f", min {entry['min_loss']:.4f}, max {entry['max_loss']:.4f}" if "min_loss" in entry else ""
        extra += f", {entry['diverged']} diverged" if entry["diverged"] else ""
        print(f"{split_title(split)}: loss at the centre {centre_text}{extra}")
    mode = f"{result.ranks} MPI ranks" if result.ranks > 1 else "1 process"
    missing = store.size - done
    print(f"{done} of {store.size} points, {diverged} diverged (loss NaN or infinite); {int(computed)} computed "
          f"by this run in {seconds:.1f} s on {mode} ({result.points_per_pass} per pass)"
          + (f"; {missing} still missing: run the same command again to finish" if missing else ""))
    return summary


ANALYSIS = Analysis(
    name="landscape", title="Loss landscape", order=15,
    guide="Loss around the trained weights along two filter-normalised random directions.",
    shows="the loss landscape around the trained weights along two random filter-normalised directions",
    custom_run=run, add_arguments=add_arguments,
    splits=("bd_train", "clean_train", "clean_test", "bd_test", "mixed", "subset"), default_split="bd_train",
    mpi_ranks=2,
    demo_args=("--x=-1:1:11", "--y=-1:1:11", "--visual_dataset", "clean_test,bd_test", "--n_sub", "16", "--overwrite"),
    quick_args=("--x=-1:1:2", "--y=-1:1:2", "--n_sub", "8", "--overwrite"))
