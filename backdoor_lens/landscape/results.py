"""What a landscape store holds, as tables and key numbers (no drawing, no files).

A grid point is computed (a finite loss), diverged (computed, its loss NaN or infinite) or missing
(not evaluated yet); value_at answers None for a missing point, never a number.
"""
import numpy as np

from backdoor_lens.landscape.store import LandscapeStore


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


def grid_header(store: LandscapeStore) -> list:
    return ["split", "x"] + (["y"] if store.y is not None else []) + ["loss", "accuracy", "status"]


def sample_rows(splits: dict) -> list:
    """The evaluated samples, so that anyone can recompute a grid point."""
    return [[name, int(i), int(label), int(original), int(poison)]
            for name, split in splits.items()
            for i, label, original, poison in zip(split.indices, split.labels, split.original_labels, split.poison)]


SAMPLE_HEADER = ["split", "original_index", "label", "original_label", "poison"]


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


def summarise(store: LandscapeStore, splits: dict, to_second_model) -> dict:
    """Per split: sample counts, loss and accuracy at the centre (a = b = 0), diverged points, the
    lowest finite loss and where it is, the highest; with a direction to a second model, its loss
    and accuracy (at a = 1)."""
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
        if to_second_model:
            entry.update(defense_loss=value_at(store, loss, 1.0), defense_accuracy=value_at(store, acc, 1.0))
        result[split] = entry
    return result
