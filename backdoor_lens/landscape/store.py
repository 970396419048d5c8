"""The resumable HDF5 store of one landscape: directions, coordinates, loss and accuracy grids.

Layout (h5py):
    attrs:            format, settings (JSON: everything that determines the numbers), dims
    xcoordinates      (nx,)
    ycoordinates      (ny,)                      2-D only
    directions/x/<entry>, directions/y/<entry>   the tensors of dx (and dy), float as the model
    computed          (nx,) or (nx, ny) bool     the points evaluated so far
    <split>/loss, <split>/accuracy               (nx,) or (nx, ny)

Grid point (i, j) is (x[i], y[j]); its flat index is i * ny + j (i for 1-D).

"Computed" is kept apart from the values: a point whose loss came out NaN or infinite (weights
that leave the network undefined, e.g. a BatchNorm variance moved below zero) is a result, a
diverged point, not a missing one; a resume does not evaluate it again. Stores of the first
format (no `computed`: NaN meant "not computed") are read with that meaning and upgraded when
saved.

Crash safety: the file on disk is only ever replaced whole (`os.replace` of a finished copy in
the same folder), never edited in place, so a run killed at any moment leaves the previous
complete file without the points it had not saved yet. A rerun reads that file and computes
only the missing points.

The identity of a store (`landscape_settings`) is everything that decides its numbers: the
model(s), the directions' settings, the grid and a fingerprint of the evaluated samples. A run
resumes a store only when all of it matches (`open_store`); otherwise it refuses, or with
`overwrite` starts a new one.

One run at a time: `StoreLock` holds an exclusive lock on a file beside the store for the length
of a run (rank 0 under MPI, the only rank that touches the store); a second run is refused.
"""
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

from backdoor_lens.errors import UserError
from backdoor_lens.landscape.directions import DirectionSettings, fingerprint

FORMAT = "backdoor-lens-landscape-2"
FIRST_FORMAT = "backdoor-lens-landscape-1"  # NaN loss = not computed
FORMAT_PREFIX = "backdoor-lens-landscape-"


def grid_coordinates(x, y, flat) -> np.ndarray:
    """(len(flat), 2) array of (a, b) for flat indices i * ny + j (b = 0 for 1-D)."""
    flat = np.asarray(flat, dtype=np.int64)
    if y is None:
        return np.stack([np.asarray(x)[flat], np.zeros(len(flat))], axis=1)
    i, j = np.unravel_index(flat, (len(x), len(y)))
    return np.stack([np.asarray(x)[i], np.asarray(y)[j]], axis=1)


def store_format(path) -> str | None:
    """The format marker of the landscape store at `path`; None when the file is not one of ours
    (not HDF5, or HDF5 without the marker): such a file is never replaced, not even with --overwrite."""
    try:
        with h5py.File(path, "r") as handle:
            marker = handle.attrs.get("format")
    except OSError:
        return None
    if isinstance(marker, bytes):
        marker = marker.decode(errors="replace")
    return marker if isinstance(marker, str) and marker.startswith(FORMAT_PREFIX) else None


class LandscapeStore:
    """The grids in memory (rank 0), saved to `path` atomically with `save()`."""

    def __init__(self, path: Path, settings: dict, x: np.ndarray, y: np.ndarray | None, splits: list,
                 loss: dict, accuracy: dict, computed: np.ndarray):
        self.path = Path(path)
        self.settings = settings
        self.x = np.asarray(x, dtype=np.float64)
        self.y = None if y is None else np.asarray(y, dtype=np.float64)
        self.splits = list(splits)
        self.loss = loss
        self.accuracy = accuracy
        self.computed = np.asarray(computed, dtype=bool)  # grid of the points evaluated (diverged ones too)
        self.dirty = False  # results put since the last save

    # --- shape and points ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return (len(self.x),) if self.y is None else (len(self.x), len(self.y))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def coordinates(self, flat) -> np.ndarray:
        return grid_coordinates(self.x, self.y, flat)

    def missing(self) -> np.ndarray:
        """Flat indices of the points not computed yet, in grid order."""
        return np.flatnonzero(~self.computed.ravel())

    def done(self) -> int:
        return int(np.count_nonzero(self.computed))

    def diverged_grid(self, split: str) -> np.ndarray:
        """Computed points whose loss on `split` is NaN or infinite."""
        return self.computed & ~np.isfinite(self.loss[split])

    def diverged(self) -> int:
        """Computed points whose loss is NaN or infinite on any split."""
        grid = np.zeros(self.shape, dtype=bool)
        for split in self.splits:
            grid |= self.diverged_grid(split)
        return int(np.count_nonzero(grid))

    def put(self, flat, results: dict) -> None:
        """results: {split: (loss[k], accuracy[k])} for the k flat indices `flat`."""
        flat = np.asarray(flat, dtype=np.int64)
        for split, (loss, acc) in results.items():
            self.loss[split].flat[flat] = loss
            self.accuracy[split].flat[flat] = acc
        self.computed.flat[flat] = True
        self.dirty = True

    # --- files ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, settings: dict, x, y, splits, dx: dict, dy: dict | None) -> "LandscapeStore":
        """A new store with every point missing, written atomically."""
        shape = (len(x),) if y is None else (len(x), len(y))
        store = cls(path, settings, x, y, splits, {s: np.full(shape, np.nan) for s in splits},
                    {s: np.full(shape, np.nan) for s in splits}, np.zeros(shape, dtype=bool))

        def write(handle):
            handle.attrs["settings"] = json.dumps(settings, sort_keys=True)
            handle.attrs["dims"] = len(shape)
            handle.create_dataset("xcoordinates", data=store.x)
            if y is not None:
                handle.create_dataset("ycoordinates", data=store.y)
            for axis, direction in (("x", dx), ("y", dy)):
                if direction is None:
                    continue
                group = handle.create_group(f"directions/{axis}")
                for name, tensor in direction.items():
                    group.create_dataset(name, data=tensor.detach().cpu().numpy())
            store._write_grids(handle)

        _atomic_write(store.path, write, copy_from=None)
        return store

    @classmethod
    def open(cls, path) -> "LandscapeStore":
        path = Path(path)
        marker = store_format(path)
        if marker is None:
            raise UserError(f"{path} is not a Backdoor Lens landscape store; pass another --surf_file")
        if marker not in (FORMAT, FIRST_FORMAT):
            raise UserError(f"{path} is a landscape store of another version ({marker}); "
                            f"pass --overwrite to start it again, or another --surf_file")
        try:
            with h5py.File(path, "r") as handle:
                settings = json.loads(handle.attrs["settings"])
                x = handle["xcoordinates"][()]
                y = handle["ycoordinates"][()] if "ycoordinates" in handle else None
                splits = settings["splits"]
                loss = {s: handle[f"{s}/loss"][()].astype(np.float64) for s in splits}
                acc = {s: handle[f"{s}/accuracy"][()].astype(np.float64) for s in splits}
                if marker == FIRST_FORMAT:
                    computed = np.logical_and.reduce([~np.isnan(loss[s]) for s in splits])
                else:
                    computed = handle["computed"][()].astype(bool)
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"{path} cannot be read as a landscape store ({str(error).splitlines()[0]}); "
                            f"pass --overwrite to start it again") from None
        return cls(path, settings, x, y, splits, loss, acc, computed)

    def directions(self) -> tuple:
        """(dx, dy) as stored, tensors on the CPU (dy None for 1-D)."""
        with h5py.File(self.path, "r") as handle:
            read = lambda axis: {name: torch.from_numpy(ds[()]) for name, ds in handle[f"directions/{axis}"].items()}  # noqa: E731
            dx = read("x")
            dy = read("y") if "directions/y" in handle else None
        return dx, dy

    def save(self) -> None:
        """Replace the file with one holding the current grids (directions copied unchanged)."""
        if self.dirty:
            _atomic_write(self.path, self._write_grids, copy_from=self.path)
            self.dirty = False

    def _write_grids(self, handle) -> None:
        handle.attrs["format"] = FORMAT  # a store of the first format is upgraded with its first save
        grids = {"computed": self.computed}
        for split in self.splits:
            grids[f"{split}/loss"], grids[f"{split}/accuracy"] = self.loss[split], self.accuracy[split]
        for key, grid in grids.items():
            if key in handle:
                handle[key][...] = grid
            else:
                handle.create_dataset(key, data=grid)
        for split in self.splits:
            handle[split].attrs["computed"] = self.done()
            handle[split].attrs["diverged"] = int(np.count_nonzero(self.diverged_grid(split)))


# --- which store a run resumes ------------------------------------------------------------------

def split_fingerprint(split) -> str:
    """A short hash of the samples a split serves (which ones, their labels, which are poisoned)."""
    digest = hashlib.sha1()
    for array in (split.indices, split.labels, split.poison):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def landscape_settings(base: dict, target: dict | None, directions: DirectionSettings, x, y, splits: dict) -> dict:
    """Everything that decides the numbers: a store is resumed only when all of it matches.

    base, target: the entries of the centre model and of the second model (None for random
    directions); splits: {name: Split} evaluated at every point.
    """
    settings = {
        "model": fingerprint(base, target), "dir_type": directions.dir_type,
        "direction_to": directions.to_second_model, "xnorm": directions.xnorm, "xignore": directions.xignore,
        "seed": directions.seed, "same_dir": directions.same_dir,
        "ynorm": directions.ynorm if y is not None else None, "yignore": directions.yignore if y is not None else None,
        "x": [float(x[0]), float(x[-1]), len(x)], "y": None if y is None else [float(y[0]), float(y[-1]), len(y)],
        "splits": list(splits), "data": {name: split_fingerprint(split) for name, split in splits.items()},
    }
    return json.loads(json.dumps(settings, sort_keys=True))  # as it reads back from the file


def open_store(path: Path, settings: dict, x, y, names, make_dirs, overwrite: bool):
    """(store, dx, dy, created): the existing store when its settings match (resumed), else a new one
    with the directions make_dirs() returns.

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


@contextmanager
def held_store(path: Path, settings: dict, x, y, names, make_dirs, overwrite: bool):
    """(store, dx, dy) for the length of a run, under the store's lock (open_store's store).

    Leaving with an error removes a store this run created and never filled (it is worth nothing);
    leaving in any way releases the lock.
    """
    lock = StoreLock(path)
    store, created = None, False
    try:
        lock.acquire()
        store, dx, dy, created = open_store(path, settings, x, y, names, make_dirs, overwrite)
        yield store, dx, dy
    except BaseException:
        if created and store.done() == 0:
            store.path.unlink(missing_ok=True)
        raise
    finally:
        lock.release()


class StoreLock:
    """An exclusive lock on a store for the length of a run: flock (non-blocking) on
    `.<store name>.lock` beside it, removed again on release."""

    def __init__(self, store_path: Path):
        self.store = Path(store_path)
        self.path = self.store.parent / f".{self.store.name}.lock"
        self.descriptor = None

    def acquire(self) -> None:
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 200).decode(errors="replace").strip()
                os.close(descriptor)
                raise UserError(f"{self.store} is in use by another landscape run"
                                f"{f' ({holder})' if holder else ''}; wait until it ends, "
                                f"or pass another --surf_file") from None
            # The run before us removes the file when it ends; a lock on a removed file locks nothing.
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.descriptor = descriptor

    def release(self) -> None:
        if self.descriptor is None:
            return
        if _same_file(self.descriptor, self.path):
            self.path.unlink()
        os.close(self.descriptor)
        self.descriptor = None


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _atomic_write(path: Path, write, copy_from: Path | None) -> None:
    """Write a sibling temporary file (optionally starting from a copy), then rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, temporary)
        with h5py.File(temporary, "r+" if copy_from is not None else "w") as handle:
            write(handle)
        with open(temporary, "rb") as flushed:
            os.fsync(flushed.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; a store is an ordinary output
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path) -> None:
    """Temporaries of a run killed while saving (the store itself is intact)."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        stale.unlink(missing_ok=True)


def describe_difference(stored: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    shown = [f"{k}: {stored.get(k)!r} vs {wanted.get(k)!r}" for k in keys[:3]]
    return "; ".join(shown) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
