"""The embedding figure of t-SNE and UMAP: one scatter panel per model, poisoned and cross samples on top."""
import numpy as np
from matplotlib.lines import Line2D

from backdoor_lens.plot.base import class_colors, legend_outside, side_by_side
from backdoor_lens.stats.embedding import CLEAN, CROSS, POISONED

MAX_LEGEND_CLASSES = 20


def draw_embedding(ax, emb, labels, class_names, target, title: str):
    """Clean samples as class-coloured dots; poisoned (black x) and cross (black triangle) on top."""
    labels = np.asarray(labels)
    n = len(labels)
    size = float(np.clip(4000.0 / n, 3.0, 30.0))
    colors = class_colors(len(class_names))
    clean = emb.groups == CLEAN
    handles, names = [], []
    many = len(np.unique(labels[clean])) > MAX_LEGEND_CLASSES
    for cls in np.unique(labels[clean]):
        keep = clean & (labels == cls)
        if many and cls == target:
            # Among dozens of similar hues the target class needs a shape of its own.
            handle = ax.scatter(emb.coords[keep, 0], emb.coords[keep, 1], s=size * 1.5 + 4, marker="s",
                                color=colors[cls], edgecolors="black", linewidths=0.6, zorder=3)
        else:
            handle = ax.scatter(emb.coords[keep, 0], emb.coords[keep, 1], s=size, color=colors[cls], alpha=0.75,
                                linewidths=0, zorder=2)
        handles.append(handle)
        names.append(class_names[cls] + (" (target)" if cls == target else ""))
    on_top = []
    poisoned = emb.groups == POISONED
    if poisoned.any():
        served = np.unique(labels[poisoned])
        label = f"poisoned \u2192 {class_names[served[0]]}" if len(served) == 1 else "poisoned (attack labels)"
        on_top.append((ax.scatter(emb.coords[poisoned, 0], emb.coords[poisoned, 1], s=size * 2.0 + 6, marker="x",
                                  color="black", linewidths=1.0, zorder=4), f"{label} ({poisoned.sum()})"))
    cross = emb.groups == CROSS
    if cross.any():
        on_top.append((ax.scatter(emb.coords[cross, 0], emb.coords[cross, 1], s=size * 2.0 + 6, marker="^",
                                  facecolors="none", edgecolors="black", linewidths=0.9, zorder=3),
                       f"cross: flagged, label kept ({cross.sum()})"))
    ax.set_xticks([]); ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    shown = list(np.unique(labels[clean]))
    if many:
        # Dozens of near-identical hues say nothing: keep the target class and summarise the rest.
        keep = [i for i, cls in enumerate(shown) if cls == target]
        handles = [handles[i] for i in keep] + [Line2D([], [], linestyle="none", marker="o", markersize=5,
                                                       color="#bbbbbb")]
        names = [names[i] for i in keep] + [f"{len(shown) - len(keep)} other classes (one hue each)"]
    return [h for h, _ in on_top] + handles, [t for _, t in on_top] + names


def embedding_figure(panels, names, target, suptitle: str):
    """panels: [(Embedding, served labels, panel title)], one per model, side by side, one legend for all."""
    fig, axes = side_by_side(len(panels), width=6.0, height=5.6)
    for ax, (emb, labels, title) in zip(axes, panels):
        legend = draw_embedding(ax, emb, labels, names, target, title)
    legend_outside(axes[-1], *legend, title="served label")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig
