"""Loss landscape: loss and accuracy of the model around its weights along one or two directions.

After Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018): grid point (a, b)
is the model with weights w + a*dx + b*dy, where dx, dy are Gaussian directions rescaled filter by
filter to the norms of the weights' own filters (biases and BatchNorm fixed), or dx = w_defense -
w_attack with --direction_to defense (a = 0 is the backdoored model, a = 1 the repaired one).
Loss is the mean cross-entropy on a fixed stratified subset of the split (--n_sub), BatchNorm in
eval mode. Points are spread over MPI ranks and saved in a resumable HDF5 store:

    mpirun -n 4 python visual_landscape.py --result_file_attack record/<name> --x=-1:1:51 --y=-1:1:51

A run stopped for any reason keeps the points it saved; the same command again computes only the
missing ones. A point whose loss is NaN or infinite (weights that leave the network undefined, e.g.
a BatchNorm variance moved below zero) is a result: drawn and counted as diverged, never recomputed.
One run at a time per store: a second one is refused while the first holds the store's lock.
"""
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from loss_landscape.directions import DIR_TYPES, IGNORES, NORMS, base_entries, fingerprint, make_directions
from loss_landscape.evaluate import GridEvaluator, load_batches
from loss_landscape.plots import plot_contours, plot_curves, plot_heatmaps, plot_surfaces, split_title
from loss_landscape.schedule import get_comm, rank_device, run_points, share_cpu_threads
from loss_landscape.store import LandscapeStore, StoreLock, describe_difference, grid_coordinates, \
    remove_stale_temporaries, store_format
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.output import check_writable_location, make_folders, remove_empty, writable
from utils.splits import SPLITS

# The demo: clean and poisoned test sets side by side on an 11 x 11 grid, 2 MPI ranks.
DEMO_ARGS = ["--x=-1:1:11", "--y=-1:1:11", "--visual_dataset", "clean_test,bd_test", "--n_sub", "16", "--overwrite"]
DEMO_MPI_RANKS = 2

# 1000 samples: a 51 x 51 grid is 2.6 million image evaluations, a few minutes on one GPU.
DEFAULT_N_SUB = 1000


def add_arguments(parser):
    for action in parser._actions:
        if action.dest == "n_sub":
            action.default = DEFAULT_N_SUB
            action.help = ("evaluate every grid point on a fixed stratified subset of this many samples per split "
                           "(keeps a 51x51 grid to minutes on one GPU)")
        elif action.dest == "visual_dataset":
            action.help = ("split(s), comma-separated, e.g. clean_train,bd_train for clean and poisoned side "
                           "by side; a poisoned split the record lacks falls back to its clean one")
    group = parser.add_argument_group("loss landscape")
    group.add_argument("--x", default="-1:1:51", help="grid along the first direction, min:max:points "
                                                       "(write --x=-1:1:51, with '=')")
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
    group.add_argument("--points_per_pass", type=int, default=0,
                       help="grid points evaluated together per batch (batched weights via torch.vmap); "
                            "0: measured on GPUs, 1 on CPUs (where batching is not faster)")
    group.add_argument("--max_points", type=int, default=None,
                       help="stop after computing this many new points (the rest on a later run)")
    group.add_argument("--save_every", type=float, default=60.0, help="seconds between saves of the store")


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


def resolve_splits(text: str, record) -> tuple:
    """The split names asked for, a poisoned one the record lacks replaced by its clean one."""
    names, notes = [], []
    for name in (part.strip() for part in str(text).split(",")):
        if not name:
            continue
        if name not in SPLITS:
            raise UserError(f"unknown --visual_dataset {name!r}; choose one of {', '.join(SPLITS)}")
        if name in ("bd_train", "subset") and record.bd_train is None:
            notes.append(f"this record has no poisoned training set; using clean_train instead of {name}")
            name = "clean_train"
        elif name in ("bd_test", "mixed") and record.bd_test is None:
            notes.append(f"this record has no poisoned test set; using clean_test instead of {name}")
            name = "clean_test"
        if name not in names:
            names.append(name)
    if not names:
        raise UserError("--visual_dataset names no split; e.g. --visual_dataset bd_train")
    return names, notes


def split_fingerprint(split) -> str:
    import hashlib

    digest = hashlib.sha1()
    for array in (split.indices, split.labels, split.poison):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def validate(args) -> tuple:
    x = parse_axis(args.x, "--x")
    y = parse_axis(args.y, "--y") if args.y not in (None, "") else None
    if args.points_per_pass < 0:
        raise UserError("--points_per_pass must be 0 (automatic) or more")
    if args.max_points is not None and args.max_points < 1:
        raise UserError("--max_points must be at least 1")
    if args.save_every < 0:
        raise UserError("--save_every must not be negative")
    if args.same_dir and y is None:
        raise UserError("--same_dir needs a 2-D grid; give --y too")
    if args.direction_to and not args.result_file_defense:
        raise UserError("--direction_to defense needs the defense model; pass --result_file_defense")
    return x, y


def surf_path(args, ctx) -> Path:
    """The store's path, refused (one line) where the landscape must not or cannot write."""
    if not args.surf_file:
        return ctx.out.final / "landscape.h5"
    surf = Path(args.surf_file).expanduser()
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


def open_store(path: Path, settings: dict, x, y, names, make_dirs, overwrite: bool):
    """(store, dx, dy, created): the existing store when its settings match (resumed), else a new one.

    A store with other settings (or an unreadable store) is an error unless `overwrite`: computed
    points are never dropped silently. A file that is not a landscape store is never replaced.
    Call with the store's lock held.
    """
    remove_stale_temporaries(path)
    if path.exists():
        if store_format(path) is None:
            raise UserError(f"{path} exists and is not a landscape store; it is not replaced, even with "
                            f"--overwrite: pass another --surf_file")
        try:
            store = LandscapeStore.open(path)
        except UserError:
            if not overwrite:
                raise
            store = None
        if store is not None and store.settings == settings:
            return (store, *store.directions(), False)
        if store is not None and not overwrite:
            raise UserError(f"{path} holds a landscape with other settings ({describe_difference(store.settings, settings)}); "
                            f"rerun with the same flags to resume it, or pass --overwrite or another --surf_file")
    dx, dy = make_dirs()
    return LandscapeStore.create(path, settings, x, y, names, dx, dy), dx, dy, True


def grid_rows(store: LandscapeStore) -> list:
    """One row per split and point; status computed, diverged (loss nan or inf) or missing (empty values)."""
    rows = []
    coords = store.coordinates(np.arange(store.size))
    computed = store.computed.ravel()
    for split in store.splits:
        loss, acc = store.loss[split].ravel(), store.accuracy[split].ravel()
        for k, (a, b) in enumerate(coords):
            row = [split, f"{a:.6g}"] + ([f"{b:.6g}"] if store.y is not None else [])
            if not computed[k]:
                row += ["", "", "missing"]
            else:
                row += [f"{loss[k]:.8g}", f"{acc[k]:.6g}", "computed" if np.isfinite(loss[k]) else "diverged"]
            rows.append(row)
    return rows


def sample_rows(splits: dict) -> list:
    """The evaluated samples, so that anyone can recompute a grid point."""
    return [[name, int(i), int(label), int(original), int(poison)]
            for name, split in splits.items()
            for i, label, original, poison in zip(split.indices, split.labels, split.original_labels, split.poison)]


def value_at(store: LandscapeStore, grid: np.ndarray, a: float, b: float = 0.0):
    """The grid's value at (a, b): None when that is no grid point or not computed yet (NaN or inf
    when it diverged)."""
    i = np.flatnonzero(np.isclose(store.x, a, atol=1e-9))
    if not len(i):
        return None
    if store.y is None:
        at = (i[0],)
    else:
        j = np.flatnonzero(np.isclose(store.y, b, atol=1e-9))
        if not len(j):
            return None
        at = (i[0], j[0])
    return float(grid[at]) if store.computed[at] else None


def summarise(store: LandscapeStore, splits: dict, direction_to) -> dict:
    result = {}
    for split in store.splits:
        loss, acc = store.loss[split], store.accuracy[split]
        entry = {"samples": len(splits[split]), "poisoned_samples": int(splits[split].poison.sum()),
                 "center_loss": value_at(store, loss, 0.0), "center_accuracy": value_at(store, acc, 0.0),
                 "diverged": int(np.count_nonzero(store.diverged_grid(split)))}
        finite = store.computed & np.isfinite(loss)
        if finite.any():
            shown = np.where(finite, loss, np.inf)
            k = int(np.argmin(shown))
            a, b = store.coordinates([k])[0]
            entry.update(min_loss=float(shown.ravel()[k]), min_loss_at=[float(a), float(b)] if store.y is not None
                         else [float(a)], max_loss=float(loss[finite].max()))
        if direction_to:
            entry.update(defense_loss=value_at(store, loss, 1.0), defense_accuracy=value_at(store, acc, 1.0))
        result[split] = entry
    return result


def write_figures(store: LandscapeStore, out, title: str, direction_to, model_label: str) -> list:
    if direction_to:
        xlabel = "α: 0 = attack model, 1 = defense model"
        marks = [(0.0, 0.0, "attack model", "#d62728")]
        if store.x.min() <= 1.0 <= store.x.max():
            marks.append((1.0, 0.0, "defense model", "#1f77b4"))
    else:
        xlabel = "α (direction x)"
        marks = [(0.0, 0.0, f"{model_label} model", "#d62728")]
    ylabel = "β (direction y)"
    if store.y is not None and not (store.y.min() <= 0.0 <= store.y.max()):
        marks = []
    loss = {split: store.loss[split] for split in store.splits}
    acc = {split: store.accuracy[split] for split in store.splits}
    computed = store.computed
    if store.y is None:
        return [out.save_figure(plot_curves(store.x, loss, acc, computed, title, xlabel, marks), "landscape_curve")]
    return [out.save_figure(plot_contours(store.x, store.y, loss, computed, title, xlabel, ylabel, marks),
                            "landscape_contour"),
            out.save_figure(plot_heatmaps(store.x, store.y, loss, acc, computed, title, xlabel, ylabel, marks),
                            "landscape_heatmap"),
            out.save_figure(plot_surfaces(store.x, store.y, loss, computed, title, xlabel, ylabel),
                            "landscape_surface")]


def landscape_settings(base, target, dir_type, args, x, y, splits: dict) -> dict:
    """Everything that decides the numbers: a store is resumed only when all of it matches."""
    settings = {
        "model": fingerprint(base, target), "dir_type": dir_type, "direction_to": args.direction_to,
        "xnorm": args.xnorm, "xignore": args.xignore, "seed": args.seed, "same_dir": args.same_dir,
        "ynorm": args.ynorm if y is not None else None, "yignore": args.yignore if y is not None else None,
        "x": [float(x[0]), float(x[-1]), len(x)], "y": None if y is None else [float(y[0]), float(y[-1]), len(y)],
        "splits": list(splits), "data": {name: split_fingerprint(split) for name, split in splits.items()},
    }
    return json.loads(json.dumps(settings, sort_keys=True))  # as it reads back from the file


def evaluate_grid(comm, evaluator, store, todo, x, y, save_every: float) -> int:
    """Run the points `todo` over the ranks; rank 0 saves the store every save_every seconds and at
    the end (also when stopped by Ctrl-C or SIGTERM, which the context turns into an interrupt).
    Returns the points computed (0 off rank 0)."""
    coordinates = functools.partial(grid_coordinates, x, y)
    if comm.rank != 0:
        return run_points(evaluator, coordinates, todo, comm, evaluator.points_per_pass, None)
    last_save = [time.monotonic()]

    def on_result(flat, results):
        store.put(flat, results)
        if time.monotonic() - last_save[0] >= save_every:
            store.save()
            last_save[0] = time.monotonic()

    try:
        computed = run_points(evaluator, coordinates, todo, comm, evaluator.points_per_pass, on_result)
    except KeyboardInterrupt:
        store.save()
        print(f"interrupted: {store.done()} of {store.size} points are saved in {store.path}; "
              f"the same command resumes")
        raise
    store.save()
    return computed


def write_outputs(ctx, store, splits: dict, args, centre_label: str, computed: int, seconds: float, comm,
                  evaluator, threads: int, dir_type: str) -> dict:
    kind = "direction to the defense model" if args.direction_to else f"{args.xnorm}-normalised random directions"
    title = (f"Loss landscape of {ctx.record.name} around the {centre_label} model ({kind}; "
             f"{', '.join(f'{len(s)} {n}' for n, s in splits.items())} samples)")
    write_figures(store, ctx.out, title, args.direction_to, centre_label)
    header = ["split", "x"] + (["y"] if store.y is not None else []) + ["loss", "accuracy", "status"]
    ctx.out.save_csv("landscape_grid", grid_rows(store), header=header)
    ctx.out.save_csv("landscape_samples", sample_rows(splits),
                     header=["split", "original_index", "label", "original_label", "poison"])
    done, diverged = store.done(), store.diverged()
    per_split = summarise(store, splits, args.direction_to)
    summary = {
        "dims": 1 if store.y is None else 2, "grid": list(store.shape), "points_total": store.size,
        "points_computed": done, "points_diverged": diverged, "points_this_run": int(computed),
        "complete": done == store.size,
        "eval_seconds": round(seconds, 3),
        "seconds_per_point": round(seconds / computed, 5) if computed else None,  # wall, all ranks together
        "ranks": comm.size, "points_per_pass": evaluator.points_per_pass, "threads_per_rank": threads,
        "dir_type": dir_type, "direction_to": args.direction_to, "store": str(store.path), "splits": per_split,
    }
    ctx.out.save_json("summary", summary)
    for split, entry in per_split.items():
        centre = entry["center_loss"]
        centre_text = "not computed" if centre is None else "diverged" if not np.isfinite(centre) else \
            f"{centre:.4f} (accuracy {entry['center_accuracy']:.4f})"
        extra = f", min {entry['min_loss']:.4f}, max {entry['max_loss']:.4f}" if "min_loss" in entry else ""
        extra += f", {entry['diverged']} diverged" if entry["diverged"] else ""
        print(f"{split_title(split)}: loss at the centre {centre_text}{extra}")
    mode = f"{comm.size} MPI ranks" if comm.size > 1 else "1 process"
    missing = store.size - done
    print(f"{done} of {store.size} points, {diverged} diverged (loss NaN or infinite); {int(computed)} computed "
          f"by this run in {seconds:.1f} s on {mode} ({evaluator.points_per_pass} per pass)"
          + (f"; {missing} still missing: run the same command again to finish" if missing else ""))
    return summary


def run(args) -> dict:
    comm = get_comm()
    args.device = rank_device(comm, args.device)
    threads = share_cpu_threads(comm)
    x, y = validate(args)
    with load_context(args, "landscape", split=None) as ctx:
        names, notes = resolve_splits(args.visual_dataset, ctx.record)
        for note in notes if comm.rank == 0 else ():
            print(f"note: {note}")
        splits = {name: ctx.get_split(name, n_sub=args.n_sub, c_sub=args.c_sub) for name in names}
        ctx.split = splits[names[0]]
        centre = ctx.models["attack"] if args.direction_to else ctx.model
        centre_label = "attack" if args.direction_to else ctx.model_label
        dir_type = args.dir_type or ("states" if args.direction_to else "weights")
        base = base_entries(centre, dir_type)
        target = base_entries(ctx.models["defense"], dir_type) if args.direction_to else None
        settings = landscape_settings(base, target, dir_type, args, x, y, splits)
        surf = surf_path(args, ctx)
        # The data first: a split that cannot be read must not leave an empty store behind.
        data = {name: load_batches(ctx.loader(split), ctx.device, desc=f"load {name}") for name, split in splits.items()}

        # Rank 0 owns the store (the only rank that reads or writes it) and holds its lock for the
        # whole run; everyone learns the directions and the points still to do.
        reply, store, created, folders = None, None, False, []
        lock = StoreLock(surf)
        try:
            if comm.rank == 0:
                try:
                    final = ctx.out.final.resolve()
                    if surf.resolve().is_relative_to(final):  # carried into the output folder that replaces it
                        ctx.out.keep(str(surf.resolve().relative_to(final)))
                    else:
                        folders = make_folders(surf.parent)
                    lock.acquire()
                    make = functools.partial(make_directions, base, two_d=y is not None, seed=args.seed,
                                             xnorm=args.xnorm, ynorm=args.ynorm, xignore=args.xignore,
                                             yignore=args.yignore, same_dir=args.same_dir, target=target)
                    store, dx, dy, created = open_store(surf, settings, x, y, names, make, args.overwrite)
                    todo = store.missing()
                    reply = ("ok", dx, dy, todo[:args.max_points] if args.max_points else todo)
                except UserError as error:
                    reply = ("error", str(error))
            reply = comm.bcast(reply, root=0)
            if reply[0] == "error":
                raise UserError(reply[1])
            _, dx, dy, todo = reply
            if ctx.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # one input shape for thousands of passes
            evaluator = GridEvaluator(centre, base, dx, dy, data, ctx.device,
                                      points_per_pass=max(1, args.points_per_pass))
            if args.points_per_pass == 0:  # automatic: measured on a GPU, one per pass on a CPU
                chosen = evaluator.choose_points_per_pass() if comm.rank == 0 and ctx.device.type == "cuda" \
                    and len(todo) > 1 else 1
                evaluator.points_per_pass = comm.bcast(chosen, root=0)  # the ranks must cut the same chunks

            started = time.perf_counter()
            computed = evaluate_grid(comm, evaluator, store, todo, x, y, args.save_every)
            if comm.rank != 0:
                return {}  # rank 0 writes every output
            seconds = time.perf_counter() - started
            if evaluator.note:
                print(f"note: {evaluator.note}")
            summary = write_outputs(ctx, store, splits, args, centre_label, computed, seconds, comm, evaluator,
                                    threads, dir_type)
            return ctx.finish(summary)
        except BaseException:
            if created and store.done() == 0:  # a store this run made and never filled is worth nothing
                store.path.unlink(missing_ok=True)
            raise
        finally:
            lock.release()
            remove_empty(folders)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="bd_train")
