"""The resumable HDF5 store of one landscape: directions, coordinates, loss and accuracy grids.

Layout (h5py):
    attrs:            format, settings (JSON: everything that determines the numbers), dims
    xcoordinates      (nx,)
    ycoordinates      (ny,)                      2-D only
    directions/x/<entry>, directions/y/<entry>   the tensors of dx (and dy), float as the model
    <split>/loss, <split>/accuracy               (nx,) or (nx, ny); NaN where not yet computed

Grid point (i, j) is (x[i], y[j]); its flat index is i * ny + j (i for 1-D).

Crash safety: the file on disk is only ever replaced whole (`os.replace` of a finished copy in
the same folder), never edited in place, so a run killed at any moment leaves the previous
complete file, with NaN for the points it had not saved yet. A rerun reads that file and
computes only the NaN points.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from utils.errors import UserError

FORMAT = "backdoor-lens-landscape-1"


def grid_coordinates(x, y, flat) -> np.ndarray:
    """(len(flat), 2) array of (a, b) for flat indices i * ny + j (b = 0 for 1-D)."""
    flat = np.asarray(flat, dtype=np.int64)
    if y is None:
        return np.stack([np.asarray(x)[flat], np.zeros(len(flat))], axis=1)
    i, j = np.unravel_index(flat, (len(x), len(y)))
    return np.stack([np.asarray(x)[i], np.asarray(y)[j]], axis=1)


class LandscapeStore:
    """The grids in memory (rank 0), saved to `path` atomically with `save()`."""

    def __init__(self, path: Path, settings: dict, x: np.ndarray, y: np.ndarray | None, splits: list,
                 loss: dict, accuracy: dict):
        self.path = Path(path)
        self.settings = settings
        self.x = np.asarray(x, dtype=np.float64)
        self.y = None if y is None else np.asarray(y, dtype=np.float64)
        self.splits = list(splits)
        self.loss = loss
        self.accuracy = accuracy
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
        """Flat indices of points that some split still lacks, in grid order."""
        gap = np.zeros(self.size, dtype=bool)
        for split in self.splits:
            gap |= np.isnan(self.loss[split].ravel())
        return np.flatnonzero(gap)

    def done(self) -> int:
        return self.size - len(self.missing())

    def put(self, flat, results: dict) -> None:
        """results: {split: (loss[k], accuracy[k])} for the k flat indices `flat`."""
        flat = np.asarray(flat, dtype=np.int64)
        for split, (loss, acc) in results.items():
            self.loss[split].flat[flat] = loss
            self.accuracy[split].flat[flat] = acc
        self.dirty = True

    # --- files ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, settings: dict, x, y, splits, dx: dict, dy: dict | None) -> "LandscapeStore":
        """A new store with every point missing (NaN), written atomically."""
        shape = (len(x),) if y is None else (len(x), len(y))
        store = cls(path, settings, x, y, splits, {s: np.full(shape, np.nan) for s in splits},
                    {s: np.full(shape, np.nan) for s in splits})

        def write(handle):
            handle.attrs["format"] = FORMAT
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
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("format") != FORMAT:
                    raise UserError(f"{path} is not a Backdoor Lens landscape store; "
                                    f"pass another --surf_file or --overwrite")
                settings = json.loads(handle.attrs["settings"])
                x = handle["xcoordinates"][()]
                y = handle["ycoordinates"][()] if "ycoordinates" in handle else None
                splits = settings["splits"]
                loss = {s: handle[f"{s}/loss"][()].astype(np.float64) for s in splits}
                acc = {s: handle[f"{s}/accuracy"][()].astype(np.float64) for s in splits}
        except (OSError, KeyError) as error:
            raise UserError(f"{path} cannot be read as a landscape store ({str(error).splitlines()[0]}); "
                            f"pass --overwrite to start it again") from None
        return cls(path, settings, x, y, splits, loss, acc)

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
        for split in self.splits:
            for name, grid in (("loss", self.loss[split]), ("accuracy", self.accuracy[split])):
                key = f"{split}/{name}"
                if key in handle:
                    handle[key][...] = grid
                else:
                    handle.create_dataset(key, data=grid)
            handle[split].attrs["computed"] = int(np.count_nonzero(~np.isnan(self.loss[split])))


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
