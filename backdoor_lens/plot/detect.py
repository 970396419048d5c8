"""The poison detectors' figures: ROC curves and score histograms against the ground truth, and
Neural Cleanse's anomaly indices with the recovered mask beside the true trigger footprint."""
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from backdoor_lens.attribution.footprint import WHOLE_IMAGE
from backdoor_lens.plot.attribution import draw_footprint
from backdoor_lens.plot.base import class_colors, plt, show_image, tick_labels
from backdoor_lens.stats.detectors import SCORE_MEANING, TITLES, TRAIN_DETECTORS
from backdoor_lens.stats.embedding import GROUP_NAMES

GROUP_STYLE = {"clean": ("#7f7f7f", "clean"), "poisoned": ("#d62728", "poisoned"),
               "cross": ("#ff7f0e", "cross (flagged, label kept)")}


def fmt_rate(value) -> str:
    """A rate (TPR, FPR) in three decimals, n/a when undefined."""
    return "n/a" if value is None else f"{value:.3f}"


def _bins(values: np.ndarray):
    """40 bins; logarithmic for positive scores spread over more than three decades."""
    low, high = float(values.min()), float(values.max())
    if low > 0 and high / max(float(np.percentile(values, 1)), 1e-300) > 1e3:
        return np.geomspace(low, high, 41), True
    if high == low:
        return np.linspace(low - 0.5, high + 0.5, 41), False
    return np.linspace(low, high, 41), False


def draw_scores(result):
    """ROC curves of every sample-level detector, then one score histogram each (poisoned vs clean)."""
    names = list(result.metrics)
    cols = min(3, len(names) + 1)
    rows = int(np.ceil((len(names) + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[len(names) + 1:]:
        ax.axis("off")
    roc = flat[0]
    colors = dict(zip(names, class_colors(max(len(names), 1))))
    for name in names:
        m = result.metrics[name]
        if m["auroc"] is not None:
            roc.plot(m["roc_fpr"], m["roc_tpr"], color=colors[name], linewidth=1.6,
                     label=f"{TITLES[name]} {m['auroc']:.3f}", drawstyle="steps-post")
    roc.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    for limit in (0.01, 0.05):
        roc.axvline(limit, color="#cccccc", linewidth=0.8)
    roc.set_xlabel("false positive rate (clean flagged)")
    roc.set_ylabel("true positive rate (poisoned flagged)")
    roc.set_title("ROC (AUROC in the legend)", fontsize=9)
    roc.legend(fontsize=7, loc="lower right")
    for ax, name in zip(flat[1:], names):
        scored = result.train if name in TRAIN_DETECTORS else result.strip
        scores = scored.detections[name].scores
        bins, log = _bins(scores)
        for group, (color, label) in GROUP_STYLE.items():
            keep = np.array([GROUP_NAMES[g] == group for g in scored.groups])
            if keep.any():
                # Each group's share per bin: comparable between groups of any size, and on log bins too.
                ax.hist(scores[keep], bins=bins, weights=np.full(keep.sum(), 1 / keep.sum()),
                        histtype="stepfilled" if group == "clean" else "step", color=color,
                        alpha=0.45 if group == "clean" else 1.0, linewidth=1.4, label=f"{label} ({keep.sum()})")
        if log:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(5))
        m = result.metrics[name]
        auroc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
        ax.set_title(f"{TITLES[name]} on {scored.split}: AUROC {auroc}\nrule TPR {fmt_rate(m['rule_tpr'])}, "
                     f"FPR {fmt_rate(m['rule_fpr'])}", fontsize=9)
        ax.set_xlabel(SCORE_MEANING[name] + " (higher = more suspect)", fontsize=7)
        ax.set_ylabel("share of the group", fontsize=8)
        ax.legend(fontsize=7)
    layer = f", features of {result.layer}" if result.layer else ""
    fig.suptitle(f"Poison detectors against the ground truth, {result.model} model of {result.record}{layer}",
                 fontsize=11)
    fig.tight_layout()
    return fig


def draw_cleanse(result):
    """NC's anomaly index per class, and the recovered mask next to the true trigger footprint."""
    c = result.cleanse
    shown = result.target if result.target is not None and result.target in c.classes else int(
        c.classes[np.argmin(c.norms)])
    extra = [c.flagged] if c.flagged is not None and c.flagged != shown else []
    panels = 3 + len(extra)
    fig = plt.figure(figsize=(max(10.0, 0.12 * len(c.classes) + 4), 7.2))
    grid = fig.add_gridspec(2, panels, height_ratios=[1.0, 1.3])
    bars = fig.add_subplot(grid[0, :])
    median = np.median(c.norms)
    finite = np.where(np.isfinite(c.anomaly), c.anomaly, np.nan)
    signed = np.where(c.norms < median, finite, -finite)
    colors = ["#d62728" if k == c.flagged else "#1f77b4" if n < median else "#bbbbbb"
              for k, n in zip(c.classes, c.norms)]
    positions = np.arange(len(c.classes))
    bars.bar(positions, np.nan_to_num(signed), color=colors,
             edgecolor=["black" if k == result.target else "none" for k in c.classes], linewidth=1.2)
    bars.axhline(2.0, color="#d62728", linestyle="--", linewidth=1, label="anomaly index 2 (NC's threshold)")
    bars.axhline(0, color="black", linewidth=0.6)
    tick_labels(bars, [result.class_names[k] for k in c.classes], axis="x")
    bars.set_ylabel("anomaly index\n(> 0: norm below the median,\n< 0: above)", fontsize=8)
    flagged = "no class flagged" if c.flagged is None else f"flagged: class {result.class_names[c.flagged]}"
    bars.set_title(f"Neural Cleanse: anomaly index of each class's smallest trigger mask (|m|_1); {flagged}; "
                   f"black edge: the attack target ({result.target})", fontsize=9)
    bars.legend(fontsize=7, loc="upper right")
    at = int(np.flatnonzero(c.classes == shown)[0])
    ax = fig.add_subplot(grid[1, 0])
    image = ax.imshow(c.masks[at], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    if result.footprint is not None:
        draw_footprint(ax, result.footprint)
    scored = result.mask_iou is not None and shown == result.target
    iou = f"\nIoU with footprint {result.mask_iou:.3f}" if scored else ""
    if scored and result.footprint.mean() >= WHOLE_IMAGE:
        iou += " (whole-image trigger:\nany mask overlaps it)"
    ax.set_title(f"recovered mask, class {result.class_names[shown]}\n|m|_1 = {c.norms[at]:.1f}{iou}", fontsize=8)
    ax.set_xticks([]); ax.set_yticks([])
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax = fig.add_subplot(grid[1, 1])
    if result.footprint is not None:
        ax.imshow(result.footprint, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"true trigger footprint\n({int(result.footprint.sum())} px, {result.footprint_pairs} pairs)",
                     fontsize=8)
    else:
        ax.text(0.5, 0.5, "no poisoned sample\nto take a footprint from", ha="center", va="center", fontsize=8)
    ax.set_xticks([]); ax.set_yticks([])
    ax = fig.add_subplot(grid[1, 2])
    trigger = torch.from_numpy(c.masks[at][None] * c.patterns[at])
    show_image(ax, trigger, f"mask x pattern, class {result.class_names[shown]}", fontsize=8)
    for column, k in enumerate(extra, start=3):
        ax = fig.add_subplot(grid[1, column])
        j = int(np.flatnonzero(c.classes == k)[0])
        ax.imshow(c.masks[j], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"mask of the flagged class {result.class_names[k]}\n|m|_1 = {c.norms[j]:.1f}", fontsize=8)
        ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(f"Neural Cleanse, {result.model} model of {result.record} ({len(c.classes)} classes, "
                 f"{result.settings.nc_steps} steps)", fontsize=11)
    fig.tight_layout()
    return fig
