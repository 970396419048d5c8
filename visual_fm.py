"""Feature maps: what one image looks like inside a layer, and what the trigger changes there.

Figure 1 (fm_image): the image (--index, its dataset index in the split, or a random one drawn
with --seed) next to the --num_maps feature maps of the layer with the largest mean activation
on it. Figure 2 (fm_poisoned_vs_clean): a poisoned image (the chosen one when it is poisoned,
else a random poisoned sample of the split) next to its clean twin (the same image without
the trigger), with the feature maps that change most (mean |poisoned - clean| over positions):
poisoned maps, clean maps (shared colour scale per channel) and their difference.
Split: bd_test when the record has it, else clean_test (then figure 2 is left out).
The layer: --target_layer_name (default the model's last conv); the model: the defense model
when one is given, else the attack's.
"""
from dataclasses import dataclass

import numpy as np
import torch

from utils.activations import AUTO, ReducingHooks, auto_split
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.plotting import POISON_COLOR, plt, show_image

DEMO_ARGS = ["--num_maps", "16"]
MAPS_PER_ROW = 8


def add_arguments(parser):
    parser.add_argument("--index", type=int, help="dataset index of the image (default: a random one, --seed)")
    parser.add_argument("--num_maps", type=int, default=16, help="feature maps shown per figure")


@torch.inference_mode()
def compute_feature_maps(model, images: torch.Tensor, layer: str, device) -> np.ndarray:
    """N x C x H x W (or N x C) output of `layer` for a few images (model input), as float32."""
    model.eval()
    # Copied inside the hook: an in-place op later in the forward must not change what we show.
    with ReducingHooks(model, [layer], lambda name, output: output.detach().float().clone()) as hooks:
        model(images.to(device))
    return hooks.reduced[layer].cpu().numpy()


@dataclass
class PairMaps:
    poisoned: np.ndarray  # C x H x W
    clean: np.ndarray
    change: np.ndarray  # C: mean over positions of |poisoned - clean|


def compute_pair_maps(model, poisoned_x: torch.Tensor, clean_x: torch.Tensor, layer: str, device) -> PairMaps:
    maps = compute_feature_maps(model, torch.stack([poisoned_x, clean_x]), layer, device)
    poisoned, clean = as_maps(maps[0]), as_maps(maps[1])
    change = np.abs(poisoned - clean).reshape(len(poisoned), -1).mean(1)
    return PairMaps(poisoned, clean, change)


def as_maps(output: np.ndarray) -> np.ndarray:
    """C x H x W; a vector output (Linear) becomes C maps of one pixel."""
    return output.reshape(output.shape[0], 1, 1) if output.ndim == 1 else output.reshape(output.shape[0],
                                                                                        output.shape[1], -1)


def choose_position(split, index, rng) -> int:
    if index is None:
        return int(rng.integers(len(split)))
    found = np.flatnonzero(split.indices == index)
    if len(found) == 0:
        shown = ", ".join(str(i) for i in split.indices[:5])
        raise UserError(f"--index {index} is not in split {split.name} ({len(split)} samples with dataset indices "
                        f"{shown}, ...); choose one of them or another --visual_dataset")
    return int(found[0])


def draw_maps(ax, fmap, title, vmin=None, vmax=None, cmap="viridis"):
    ax.imshow(fmap, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def figure_image(ctx, layer, image, maps: np.ndarray, channels, caption: str, title_color: str):
    """The image, then the chosen maps, MAPS_PER_ROW per row."""
    cols = min(len(channels), MAPS_PER_ROW) + 1
    rows = int(np.ceil(len(channels) / MAPS_PER_ROW))
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols + 0.3, 1.7 * rows + 0.9), squeeze=False)
    for r in range(rows):
        axes[r, 0].axis("off")
    show_image(axes[0, 0], image, caption, color=title_color, fontsize=7)
    axes[0, 0].axis("on")
    for k, channel in enumerate(channels):
        ax = axes[k // MAPS_PER_ROW, 1 + k % MAPS_PER_ROW]
        draw_maps(ax, maps[channel], f"ch {channel}: {maps[channel].mean():.3g}")
    for k in range(len(channels), rows * MAPS_PER_ROW):
        if 1 + k % MAPS_PER_ROW < cols:
            axes[k // MAPS_PER_ROW, 1 + k % MAPS_PER_ROW].axis("off")
    fig.suptitle(f"{ctx.model_label} model, {layer} ({maps.shape[0]} channels, maps {maps.shape[1]}x{maps.shape[2]}): "
                 f"the {len(channels)} maps with the largest mean activation\n(each map on its own colour scale; "
                 f"title: channel and mean activation)", fontsize=9)
    fig.tight_layout()
    return fig


def figure_pair(ctx, layer, poisoned_img, clean_img, pair: PairMaps, channels, caption: str):
    """Blocks of three rows (poisoned, clean twin, difference); the images in the first column."""
    per_row = min(len(channels), MAPS_PER_ROW)
    blocks = int(np.ceil(len(channels) / per_row))
    fig, axes = plt.subplots(3 * blocks, per_row + 1, figsize=(1.55 * (per_row + 1) + 0.6, 1.65 * 3 * blocks + 1.0),
                             squeeze=False)
    for ax in axes[:, 0]:
        ax.axis("off")
    show_image(axes[0, 0], poisoned_img, "poisoned", color=POISON_COLOR, fontsize=8)
    show_image(axes[1, 0], clean_img, "clean twin", fontsize=8)
    delta = (poisoned_img - clean_img).abs().amax(dim=0)
    show_image(axes[2, 0], delta / max(float(delta.max()), 1e-8), "|pixel difference|\n(scaled to max)", fontsize=7)
    for ax in axes[:3, 0]:
        ax.axis("on")
    for k, channel in enumerate(channels):
        block, col = divmod(k, per_row)
        p, c = pair.poisoned[channel], pair.clean[channel]
        low, high = float(min(p.min(), c.min())), float(max(p.max(), c.max()))
        diff = p - c
        bound = max(float(np.abs(diff).max()), 1e-8)
        draw_maps(axes[3 * block, col + 1], p, f"ch {channel} poisoned", low, high)
        draw_maps(axes[3 * block + 1, col + 1], c, f"ch {channel} clean", low, high)
        draw_maps(axes[3 * block + 2, col + 1], diff, f"difference\nmean |Δ| {pair.change[channel]:.3g}",
                  -bound, bound, cmap="RdBu_r")
    for k in range(len(channels), blocks * per_row):
        block, col = divmod(k, per_row)
        for r in range(3):
            axes[3 * block + r, col + 1].axis("off")
    fig.suptitle(f"{ctx.model_label} model, {layer}: the {len(channels)} maps the trigger changes most; {caption}\n"
                 f"poisoned and clean maps share a colour scale per channel; difference = poisoned - clean "
                 f"(red: higher with the trigger)", fontsize=9)
    fig.tight_layout()
    return fig


def run(args) -> dict:
    if args.num_maps < 1:
        raise UserError(f"--num_maps {args.num_maps} must be at least 1")
    with load_context(args, "fm", split=None) as ctx:
        if args.visual_dataset == AUTO:
            args.visual_dataset = auto_split(ctx.record, ("bd_test", "clean_test"))
        ctx.split = ctx.get_split(args.visual_dataset, n_sub=args.n_sub, c_sub=args.c_sub)
        split, model, layer = ctx.split, ctx.model, ctx.layer_name()
        rng = np.random.default_rng(args.seed)
        position = choose_position(split, args.index, rng)
        x, label, original, poisoned, index = split[position]
        maps = as_maps(compute_feature_maps(model, x.unsqueeze(0), layer, ctx.device)[0])
        means = maps.reshape(len(maps), -1).mean(1)
        channels = np.argsort(-means, kind="stable")[: min(args.num_maps, len(maps))]
        names = ctx.class_names
        caption = (f"poisoned: {names[original]} served as {names[label]}" if poisoned else f"label {names[label]}") \
            + f"\ndataset index {index}"
        image = split.pixels()[position][0]
        fig = figure_image(ctx, layer, image, maps, channels, caption, POISON_COLOR if poisoned else "black")
        ctx.out.save_figure(fig, "fm_image")
        ctx.out.save_csv("fm_image", [[c, float(means[c])] for c in range(len(maps))],
                         header=["neuron", "mean_activation"])
        summary = {"split": split.name, "layer": layer, "model": ctx.model_label, "dataset_index": index,
                   "poisoned": bool(poisoned), "label": label, "map_shape": list(maps.shape),
                   "channels_shown": [int(c) for c in channels]}
        served = f"poisoned, {names[original]} served as {names[label]}" if poisoned else f"clean, label {names[label]}"
        print(f"{ctx.model_label} model, {layer}: feature maps of {split.name} image #{index} "
              f"({served}); strongest channel {channels[0]} "
              f"(mean {means[channels[0]]:.3f})")
        pair_position = position if poisoned else (int(rng.choice(np.flatnonzero(split.poison)))
                                                   if split.poison.any() else None)
        if pair_position is None:
            summary["pair"] = "left out: the split has no poisoned samples (use --visual_dataset bd_test)"
            print(f"poisoned vs clean figure {summary['pair']}")
        else:
            twin = split.clean_twin()
            pair = compute_pair_maps(model, split[pair_position][0], twin[pair_position][0], layer, ctx.device)
            changed = np.argsort(-pair.change, kind="stable")[: min(args.num_maps, len(pair.change))]
            pindex = int(split.indices[pair_position])
            caption = (f"dataset index {pindex}, label {names[int(split.original_labels[pair_position])]}, "
                       f"served as {names[int(split.labels[pair_position])]}")
            fig = figure_pair(ctx, layer, split.pixels()[pair_position][0], twin.pixels()[pair_position][0], pair,
                              changed, caption)
            ctx.out.save_figure(fig, "fm_poisoned_vs_clean")
            ctx.out.save_csv("fm_poisoned_vs_clean",
                             [[c, float(pair.poisoned[c].mean()), float(pair.clean[c].mean()), float(pair.change[c])]
                              for c in range(len(pair.change))],
                             header=["neuron", "poisoned_mean", "clean_mean", "mean_abs_change"])
            summary.update({"pair_dataset_index": pindex, "channels_changed_most": [int(c) for c in changed],
                            "largest_mean_abs_change": float(pair.change[changed[0]]),
                            "mean_abs_change": float(pair.change.mean())})
            print(f"poisoned #{pindex} vs its clean twin: mean |change| over channels {pair.change.mean():.3f}, "
                  f"largest channel {changed[0]} ({pair.change[changed[0]]:.3f})")
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="auto")  # resolved in run()
