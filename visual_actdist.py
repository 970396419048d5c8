"""Activation distribution: which classes the images that activate each channel most belong to.

For every Conv, BatchNorm and Linear layer (or --layers) and every channel, the top-k samples
of the split by the channel's activation (its map averaged over positions; --reduce max: its
maximum), and the share of each class among them, poisoned samples counted as a class of their
own. k is the number of poisoned samples in the split (so that a channel that responds only to
the trigger has a top-k of 100% poisoned), or the mean count per class when there are none.
All layers come from one pass over the split (running top-k per channel: memory layers x
channels x k, whatever the number of samples).
Split: bd_train when the record has it, else mixed, else clean_test. The model: the defense
model when one is given, else the attack's.
"""
import math

import numpy as np

from utils.activations import AUTO, auto_split, class_makeup, compute_top_activations, sample_groups, topk_size
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.layers import named_layers, resolve_layers
from utils.plotting import POISON_COLOR, legend_outside, plt

DEMO_ARGS = ["--n_sub", "900"]
LAYERS_PER_FIGURE = 6
OTHER_COLOR = "#bbbbbb"
KEPT_COLOR = "#ff9896"


def add_arguments(parser):
    parser.add_argument("--layers", help="comma-separated layer names (default: every Conv, BatchNorm and Linear layer)")
    parser.add_argument("--max_neurons", type=int, default=32,
                        help="channels shown per layer (those with the largest poisoned share; the CSV has all)")
    parser.add_argument("--reduce", choices=("mean", "max"), default="mean",
                        help="a channel's activation for one image: mean or max over its positions")


def compute_actdist(model, loader, layers, device, k: int, groups: np.ndarray, num_groups: int,
                    reduce: str = "mean") -> dict:
    """{layer: C x G shares of each group among each channel's top-k samples}, from one pass."""
    top = compute_top_activations(model, loader, layers, device, k, reduce=reduce, desc="activation distribution")
    return {name: class_makeup(top.positions[name], groups, num_groups) for name in layers}


def palette(count: int) -> list:
    """Distinct colours without red, which marks poisoned samples."""
    tab20 = plt.get_cmap("tab20").colors
    order = [0, 2, 4, 8, 10, 12, 14, 16, 18, 1, 3, 5, 9, 11, 13, 15, 17, 19]
    return [tab20[order[i % len(order)]] for i in range(count)]


def shown_groups(shares: dict, names: list, num_classes: int, limit: int = 12):
    """Classes drawn in their own colour (all when few, else the `limit - 2` largest overall),
    the rest pooled as 'other classes'; poisoned groups always separate."""
    total = sum(s.sum(0) for s in shares.values())
    if num_classes <= limit:
        classes = list(range(num_classes))
    else:
        classes = sorted(np.argsort(-total[:num_classes], kind="stable")[: limit - 2].tolist())
    colors = dict(zip(classes, palette(len(classes))))
    return classes, colors


def sort_key(shares: np.ndarray, poison_columns: list) -> np.ndarray:
    """Channels by poisoned share, then by purity (share of their most common group)."""
    poisoned = shares[:, poison_columns].sum(1) if poison_columns else np.zeros(len(shares))
    return np.lexsort((-shares.max(1), -poisoned))


def stacked_bars(ax, parts, width: float = 0.85):
    """Stacked bars drawn as one collection (thousands of separate bar patches draw slowly).

    parts: [(values per bar, colour, label)], bottom to top. Returns legend handles.
    """
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    bottom = np.zeros(len(parts[0][0]))
    verts, colors, handles = [], [], []
    for values, color, label in parts:
        for x, (low, height) in enumerate(zip(bottom, values)):
            if height > 0:
                left, right = x - width / 2, x + width / 2
                verts.append([(left, low), (right, low), (right, low + height), (left, low + height)])
                colors.append(color)
        bottom = bottom + values
        handles.append(Patch(facecolor=color, label=label))
    ax.add_collection(PolyCollection(verts, facecolors=colors, edgecolors="none"))
    return handles


def draw_layer(ax, layer, shares, names, num_classes, classes, colors, max_neurons, base_rate, k):
    poison_columns = list(range(num_classes, shares.shape[1]))
    order = sort_key(shares, poison_columns)[:max_neurons]
    parts = [(shares[order, column], POISON_COLOR if names[column] == "poisoned" else KEPT_COLOR, names[column])
             for column in poison_columns]
    parts += [(shares[order, c], colors[c], names[c]) for c in classes]
    if len(classes) < num_classes:
        parts.append((1.0 - sum(values for values, _, _ in parts), OTHER_COLOR, "other classes"))
    handles = stacked_bars(ax, parts)
    if base_rate > 0:
        handles.insert(0, ax.axhline(base_rate, color="black", ls="--", lw=0.8, label="poisoned share of the split"))
    x = np.arange(len(order))
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in order], fontsize=6 if len(order) > 20 else 7, rotation=90)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of top-k", fontsize=8)
    shown = f"the {len(order)} of {len(shares)} channels with the largest poisoned share" \
        if len(order) < len(shares) else f"all {len(shares)} channels, largest poisoned share first"
    ax.set_title(f"{layer}: class make-up of each channel's top {k} images ({shown})", fontsize=9)
    return handles


def draw_overview(ctx, layers, shares, base_rate, num_classes, k):
    poisoned = np.array([s[:, num_classes:].sum(1).mean() for s in (shares[n] for n in layers)])
    most = np.array([s[:, num_classes:].sum(1).max() for s in (shares[n] for n in layers)])
    purity = np.array([shares[n].max(1).mean() for n in layers])
    fig, ax = plt.subplots(figsize=(8, max(3.5, 0.22 * len(layers) + 1.5)))
    y = np.arange(len(layers))
    if base_rate > 0:
        ax.barh(y, poisoned, color=POISON_COLOR, alpha=0.8, label="mean over channels of the poisoned share")
        ax.plot(most, y, "k|", ms=8, label="largest poisoned share of a channel")
        ax.axvline(base_rate, color="black", ls="--", lw=0.8, label=f"poisoned share of the split ({base_rate:.1%})")
        ax.set_xlabel(f"share of poisoned samples among each channel's top {k}")
    else:
        ax.barh(y, purity, color="#1f77b4", label="mean share of the most common class")
        ax.set_xlabel(f"share of the most common class among each channel's top {k}")
    ax.set_yticks(y)
    ax.set_yticklabels(layers, fontsize=6 if len(layers) > 25 else 7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(f"{ctx.model_label} model, {ctx.split.name} ({len(ctx.split)} samples): per layer", fontsize=10)
    legend_outside(ax)
    ctx.out.save_figure(fig, "actdist_overview")
    return poisoned, purity


def run(args) -> dict:
    if args.max_neurons < 1:
        raise UserError(f"--max_neurons {args.max_neurons} must be at least 1")
    with load_context(args, "actdist", split=None) as ctx:
        if args.visual_dataset == AUTO:
            args.visual_dataset = auto_split(ctx.record, ("bd_train", "mixed", "clean_test"))
        ctx.split = ctx.get_split(args.visual_dataset, n_sub=args.n_sub, c_sub=args.c_sub)
        split, model = ctx.split, ctx.model
        layers = resolve_layers(model, args.layers) if args.layers else named_layers(model)
        num_classes = ctx.num_classes
        groups, names = sample_groups(split.labels, split.original_labels, split.poison, num_classes,
                                      ctx.class_names, ctx.target_class)
        k = min(topk_size(split.labels, split.poison), len(split))
        shares = compute_actdist(model, ctx.loader(split), layers, ctx.device, k, groups, len(names), args.reduce)
        rows = [[layer, c, k] + shares[layer][c].tolist() for layer in layers for c in range(len(shares[layer]))]
        ctx.out.save_csv("actdist", rows, header=["layer", "neuron", "k"] + [f"share_{n}" for n in names])
        base_rate = float(split.poison.mean())
        classes, colors = shown_groups(shares, names, num_classes)
        pages = math.ceil(len(layers) / LAYERS_PER_FIGURE)
        for page in range(pages):
            chunk = layers[page * LAYERS_PER_FIGURE:(page + 1) * LAYERS_PER_FIGURE]
            width = max(8.0, 0.28 * min(args.max_neurons, max(len(shares[n]) for n in chunk)) + 3.5)
            fig, axes = plt.subplots(len(chunk), 1, figsize=(width, 2.3 * len(chunk) + 0.8), squeeze=False)
            for ax, layer in zip(axes[:, 0], chunk):
                handles = draw_layer(ax, layer, shares[layer], names, num_classes, classes, colors,
                                     args.max_neurons, base_rate, k)
                if ax is axes[0, 0]:
                    legend_outside(ax, handles, [h.get_label() for h in handles])
            fig.suptitle(f"Activation distribution, {ctx.model_label} model, {split.name} ({len(split)} samples); "
                         f"x: channel" + (f"; layers {page + 1} of {pages}" if pages > 1 else ""), fontsize=10)
            fig.tight_layout()
            ctx.out.save_figure(fig, f"actdist_layers_{page + 1}" if pages > 1 else "actdist_layers")
        poisoned, purity = draw_overview(ctx, layers, shares, base_rate, num_classes, k)
        summary = {"split": split.name, "samples": len(split), "model": ctx.model_label, "k": k,
                   "layers": len(layers), "poisoned_share_in_split": base_rate,
                   "mean_poisoned_share_per_layer": dict(zip(layers, poisoned.tolist())),
                   "mean_purity_per_layer": dict(zip(layers, purity.tolist()))}
        if base_rate > 0:
            best = layers[int(np.argmax(poisoned))]
            mostly = {n: int((shares[n][:, num_classes:].sum(1) > 0.5).sum()) for n in layers}
            summary.update({"layer_with_largest_poisoned_share": best,
                            "channels_with_mostly_poisoned_top_k": mostly})
            print(f"{ctx.model_label} model, {len(layers)} layers, top {k} of {len(split)} samples ({split.name}): "
                  f"poisoned share {base_rate:.1%} in the split; largest mean share among top-k: {best} "
                  f"({poisoned.max():.1%}); {sum(mostly.values())} channels with a mostly poisoned top-k")
        else:
            print(f"{ctx.model_label} model, {len(layers)} layers, top {k} of {len(split)} samples ({split.name}, "
                  f"no poisoned samples): mean class purity of the top-k {purity.mean():.1%}")
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="auto")  # resolved in run()
