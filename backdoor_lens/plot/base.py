"""Shared figure helpers: images in pixel space, class colours and legends, readable grids."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

POISON_COLOR = "#d62728"


def to_display(image) -> np.ndarray:
    """Tensor C x H x W or array H x W x C in [0, 1] -> array for imshow (gray for one channel)."""
    if torch.is_tensor(image):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3:
            image = image.transpose(1, 2, 0)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return image.clip(0, 1)


def show_image(ax, image, title: str = "", color: str = "black", fontsize: int = 8):
    img = to_display(image)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    if title:
        ax.set_title(title, color=color, fontsize=fontsize)


def grid(n: int, max_cols: int = 8, cell: float = 1.8, extra_height: float = 0.4):
    """A figure with n axes in rows of at most max_cols, sized so that 1 or 64 panels both read."""
    n = max(1, n)
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.6, cols * cell), rows * cell + extra_height), squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def class_colors(n: int):
    if n <= 10:
        base = plt.get_cmap("tab10").colors
    elif n <= 20:
        base = plt.get_cmap("tab20").colors
    else:
        base = [plt.get_cmap("hsv")(i / n) for i in range(n)]
    return [base[i % len(base)] for i in range(n)]


def legend_outside(ax, handles=None, labels=None, max_entries: int = 30, title=None):
    handles, labels = (handles, labels) if handles is not None else ax.get_legend_handles_labels()
    if len(handles) > max_entries:
        handles, labels = handles[:max_entries], labels[:max_entries]
        title = (title or "") + f" (first {max_entries})"
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title=title,
              frameon=False, markerscale=1.5)


def tick_labels(ax, names, axis: str = "both", max_shown: int = 40):
    """Class names on the ticks; at most max_shown of them, evenly spaced, for many classes."""
    n = len(names)
    step = max(1, math.ceil(n / max_shown))
    positions = list(range(0, n, step))
    shown = [names[i] for i in positions]
    size = 8 if n <= 20 else 6
    if axis in ("x", "both"):
        ax.set_xticks(positions); ax.set_xticklabels(shown, rotation=90, fontsize=size)
    if axis in ("y", "both"):
        ax.set_yticks(positions); ax.set_yticklabels(shown, fontsize=size)


def side_by_side(n: int, width: float = 5.5, height: float = 4.5):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]
