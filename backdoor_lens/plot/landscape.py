"""Figures of a landscape: contour lines with labelled levels, heat maps, 3-D surface, 1-D curve.

Grids are (nx, ny) arrays indexed [i, j] for (x[i], y[j]), with a boolean grid `computed` of the
points evaluated so far. Points not computed yet are drawn as gaps (never as a value); computed
points whose loss is NaN or infinite (the network diverged there) are drawn as red markers in the
legend. Both are counted in the titles. With two splits (clean and poisoned) the panels stand
side by side on one colour scale.
"""
import numpy as np
from matplotlib.colors import LogNorm, Normalize

from backdoor_lens.plot.base import plt

SPLIT_TITLES = {"clean_train": "clean training set", "bd_train": "poisoned training set (bd_train)",
                "clean_test": "clean test set", "bd_test": "poisoned test set (bd_test)",
                "mixed": "mixed test set", "subset": "bd_train subset"}


def split_title(split: str) -> str:
    return SPLIT_TITLES.get(split, split)


def _finite(grids) -> np.ndarray:
    values = np.concatenate([np.asarray(g, dtype=float).ravel() for g in grids])
    return values[np.isfinite(values)]


def value_range(values: np.ndarray) -> tuple:
    """(log, low, high): a log scale when the loss spans more than a decade.

    Cross-entropy of a saturated softmax is float32 rounding below about 1e-6 (it can be exactly
    0); on a log scale the floor is the lowest loss above max(1e-6, high * 1e-5), and values
    below it are drawn at the floor.
    """
    if len(values) == 0:
        return False, 0.0, 1.0
    high = float(values.max())
    positive = values[values > 0]
    if len(positive) == 0 or high <= 0:
        return False, float(values.min()), high if high > values.min() else float(values.min()) + 1e-6
    low = max(float(positive.min()), high * 1e-5, 1e-6)
    if high / low > 10:
        return True, low, high
    low = float(values.min())
    return False, low, high if high > low else low + 1e-6


def loss_levels(grids, count: int = 14) -> np.ndarray:
    """Contour levels: geometric over a wide range (so the basin stays resolved), else linear."""
    log, low, high = value_range(_finite(grids))
    return np.geomspace(low, high, count) if log else np.linspace(low, high, count)


def _norm(values):
    log, low, high = value_range(values)
    return LogNorm(low, high, clip=True) if log else Normalize(low, high)


DIVERGED_STYLE = dict(linestyle="none", marker="X", markersize=7, color="#d62728", markeredgecolor="black",
                      markeredgewidth=0.5, label="diverged (loss NaN or inf)", zorder=6,
                      clip_on=False)  # points on the grid's edge are drawn whole


def diverged_points(grid, computed) -> np.ndarray:
    return np.asarray(computed, dtype=bool) & ~np.isfinite(np.asarray(grid, dtype=float))


def _status(grid, computed) -> str:
    done = int(np.count_nonzero(computed))
    diverged = int(np.count_nonzero(diverged_points(grid, computed)))
    parts = ([f"partial: {done} of {np.size(grid)} points"] if done < np.size(grid) else []) + \
        ([f"{diverged} diverged"] if diverged else [])
    return f"  [{'; '.join(parts)}]" if parts else ""


def _gaps(grid) -> np.ndarray:
    """The grid with NaN wherever it has no value to draw (not computed, or diverged to NaN or inf)."""
    grid = np.asarray(grid, dtype=float)
    return np.where(np.isfinite(grid), grid, np.nan)


def _mark(ax, marks):
    for a, b, label, color in marks:
        ax.plot([a], [b], marker="*", markersize=13, color=color, markeredgecolor="black", linestyle="none",
                label=label, zorder=5)


def _missing(ax, x, y, computed):
    i, j = np.nonzero(~np.asarray(computed, dtype=bool))
    if len(i):
        ax.plot(x[i], y[j], linestyle="none", marker="x", markersize=4, color="0.55", label="not computed")


def _diverged(ax, x, y, grid, computed):
    i, j = np.nonzero(diverged_points(grid, computed))
    if len(i):
        ax.plot(x[i], y[j], **DIVERGED_STYLE)


def plot_contours(x, y, loss: dict, computed, title: str, xlabel: str, ylabel: str, marks=()):
    """Contour lines of the loss with labelled levels, one panel per split (each its own levels:
    a poisoned split's loss can sit orders of magnitude below the clean one)."""
    fig, axes = plt.subplots(1, len(loss), figsize=(6.0 * len(loss), 5.4), squeeze=False)
    X, Y = np.meshgrid(x, y, indexing="ij")
    for ax, (split, grid) in zip(axes[0], loss.items()):
        log, low, _ = value_range(_finite([grid]))
        masked = np.ma.masked_invalid(np.maximum(grid, low) if log else grid)  # NaN stays masked
        if np.count_nonzero(~masked.mask) >= 4 and len(x) > 1 and len(y) > 1:
            lines = ax.contour(X, Y, masked, levels=loss_levels([grid]), cmap="viridis", linewidths=1.1,
                               norm=_norm(_finite([grid])))  # geometric levels get evenly spread colours
            # Every other level labelled: labels of close levels near the minimum would overlap.
            ax.clabel(lines, lines.levels[::2], inline=True, fontsize=7, fmt=lambda v: f"{v:.3g}")
        _missing(ax, x, y, computed)
        _diverged(ax, x, y, grid, computed)
        _mark(ax, marks)
        ax.set_xlim(x.min(), x.max()); ax.set_ylim(y.min(), y.max())
        ax.set_aspect("auto")
        ax.set_xlabel(xlabel); ax.set_ylabel(ylabel)
        ax.set_title(f"loss on the {split_title(split)}{_status(grid, computed)}", fontsize=10)
        ax.grid(alpha=0.2)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_heatmaps(x, y, loss: dict, accuracy: dict, computed, title: str, xlabel: str, ylabel: str, marks=()):
    """Filled maps: loss (top row) and accuracy (bottom), per split, each row on one colour scale
    (log for a loss spanning more than a decade). Diverged points are marked in both rows."""
    n = len(loss)
    fig, axes = plt.subplots(2, n, figsize=(5.6 * n + 0.8, 9.4), squeeze=False)
    loss_norm = _norm(_finite(loss.values()))
    for row, (grids, norm, cmap, what) in enumerate(((loss, loss_norm, "magma_r", "loss"),
                                                     (accuracy, Normalize(0, 1), "viridis", "accuracy"))):
        for col, (split, grid) in enumerate(grids.items()):
            ax = axes[row, col]
            colours = plt.get_cmap(cmap).with_extremes(bad="0.85")  # no value: light grey
            shown = np.ma.masked_where(~np.asarray(computed, dtype=bool) | ~np.isfinite(grid), grid)
            image = ax.pcolormesh(x, y, shown.T, shading="nearest", cmap=colours, norm=norm)
            _diverged(ax, x, y, loss[split], computed)
            _mark(ax, marks)
            ax.set_xlabel(xlabel); ax.set_ylabel(ylabel)
            ax.set_title(f"{what} on the {split_title(split)}{_status(loss[split], computed)}", fontsize=10)
            fig.colorbar(image, ax=ax, label=what + (" (log scale)" if isinstance(norm, LogNorm) else ""))
            if ax.get_legend_handles_labels()[0] and col == 0:
                ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_surfaces(x, y, loss: dict, computed, title: str, xlabel: str, ylabel: str):
    """3-D surfaces of the loss (log10 when its range is wide), one per split, each its own z scale;
    diverged points as markers on the top of the box."""
    fig = plt.figure(figsize=(6.2 * len(loss), 5.6))
    X, Y = np.meshgrid(x, y, indexing="ij")
    for k, (split, grid) in enumerate(loss.items(), start=1):
        ax = fig.add_subplot(1, len(loss), k, projection="3d")
        log, low, high = value_range(_finite([grid]))
        Z = _gaps(grid)
        if log:
            Z, low, high = np.log10(np.maximum(Z, low)), np.log10(low), np.log10(high)
        ax.plot_surface(X, Y, Z, cmap="viridis", vmin=low, vmax=high, linewidth=0.2, edgecolor="0.3",
                        antialiased=True, rstride=1, cstride=1)
        i, j = np.nonzero(diverged_points(grid, computed))
        if len(i):
            ax.plot(x[i], y[j], np.full(len(i), high), **DIVERGED_STYLE)
            ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
        ax.set_zlim(low, high)
        ax.set_xlabel(xlabel, fontsize=8); ax.set_ylabel(ylabel, fontsize=8)
        ax.set_zlabel("log10 loss" if log else "loss", fontsize=8, labelpad=8)
        ax.set_title(f"loss on the {split_title(split)}{_status(grid, computed)}", fontsize=10)
        ax.view_init(elev=32, azim=-58)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(x, loss: dict, accuracy: dict, computed, title: str, xlabel: str, marks=()):
    """1-D: loss (left axis) and accuracy (right axis, dashed) along the direction, per split;
    diverged points as markers along the top edge."""
    fig, ax = plt.subplots(figsize=(8.4, 5.6))
    acc_ax = ax.twinx()
    colours = plt.get_cmap("tab10").colors
    log, low, _ = value_range(_finite(loss.values()))
    for k, split in enumerate(loss):
        shown = _gaps(loss[split])
        shown = np.maximum(shown, low) if log else shown
        ax.plot(x, shown, color=colours[k], marker="o", markersize=3, label=f"loss, {split_title(split)}")
        acc_ax.plot(x, np.where(computed, accuracy[split], np.nan), color=colours[k], linestyle="--",
                    label=f"accuracy, {split_title(split)}")
    diverged = np.logical_or.reduce([diverged_points(grid, computed) for grid in loss.values()])
    if diverged.any():
        ax.plot(x[diverged], np.full(int(diverged.sum()), 0.97), transform=ax.get_xaxis_transform(), **DIVERGED_STYLE)
    if log:
        ax.set_yscale("log")
    for a, _, label, color in marks:
        ax.axvline(a, color=color, linestyle=":", linewidth=1.5)
        ax.text(a, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                color=color)
    ax.set_xlabel(xlabel); ax.set_ylabel("loss (cross-entropy)")
    acc_ax.set_ylabel("accuracy"); acc_ax.set_ylim(-0.02, 1.02)
    status = "".join(_status(np.asarray(g), computed) for g in list(loss.values())[:1])
    fig.suptitle(title + status, fontsize=10, wrap=True)
    lines = ax.get_legend_handles_labels()
    more = acc_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
              fontsize=8, frameon=False)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return fig


def landscape_figures(x, y, loss: dict, accuracy: dict, computed, title: str, to_second_model,
                      model_label: str) -> dict:
    """{file name: figure}: the 1-D curve (y None), else contour lines, heat maps and surfaces.

    The centre model is starred at (0, 0); with a direction to a second model (the defense) the
    x axis runs from the attack model (0) to it (1), starred too when 1 is on the grid.
    """
    if to_second_model:
        xlabel = "α: 0 = attack model, 1 = defense model"
        marks = [(0.0, 0.0, "attack model", "#d62728")]
        if x.min() <= 1.0 <= x.max():
            marks.append((1.0, 0.0, "defense model", "#1f77b4"))
    else:
        xlabel = "α (direction x)"
        marks = [(0.0, 0.0, f"{model_label} model", "#d62728")]
    ylabel = "β (direction y)"
    if y is not None and not (y.min() <= 0.0 <= y.max()):
        marks = []  # the centre is off the grid
    if y is None:
        return {"landscape_curve": plot_curves(x, loss, accuracy, computed, title, xlabel, marks)}
    return {"landscape_contour": plot_contours(x, y, loss, computed, title, xlabel, ylabel, marks),
            "landscape_heatmap": plot_heatmaps(x, y, loss, accuracy, computed, title, xlabel, ylabel, marks),
            "landscape_surface": plot_surfaces(x, y, loss, computed, title, xlabel, ylabel)}
