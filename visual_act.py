"""Top-activating images: for --num_neuron channels of a layer, the --num_image samples of the
split that activate each channel most; poisoned samples are titled in red.

A sample's activation of channel c is the channel's map averaged over positions (--reduce max:
its maximum). Channels are taken in --neuron_order: by index; by TAC or by poisoned-minus-clean
mean activation (largest first, measured on the split's poisoned samples and their clean
twins); or in a random order drawn with --seed. One pass over the split keeps a running top-k
of every channel. Split: bd_train when the record has it, else mixed, else clean_test.
The layer: --target_layer_name (default the model's last conv); the model: the defense model
when one is given, else the attack's.
"""
import math

from utils.activations import (AUTO, NEURON_ORDERS, auto_split, compute_paired_activations, compute_top_activations,
                               neuron_order)
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.plotting import POISON_COLOR, plt, show_image

DEMO_ARGS = ["--neuron_order", "tac", "--num_neuron", "6", "--num_image", "8"]
NEURONS_PER_PAGE = 8  # rows per figure
IMAGES_SHOWN = 12  # columns per figure; the CSV lists every --num_image
MAX_PAGES = 8


def add_arguments(parser):
    parser.add_argument("--num_neuron", type=int, default=8, help="how many channels to show")
    parser.add_argument("--num_image", type=int, default=8, help="top-activating images per channel")
    parser.add_argument("--neuron_order", choices=NEURON_ORDERS, default="index",
                        help="which channels: by index, by TAC, by poisoned-minus-clean activation, or random (--seed)")
    parser.add_argument("--reduce", choices=("mean", "max"), default="mean",
                        help="a channel's activation for one image: mean or max over its positions")


def compute_top_images(model, loader, layer: str, device, num_image: int, reduce: str = "mean"):
    """(values C x k, positions C x k): every channel's k largest activations and the samples' positions."""
    top = compute_top_activations(model, loader, [layer], device, num_image, reduce=reduce, desc="top images")
    return top.values[layer], top.positions[layer]


def order_values(ctx, model, layer: str, how: str):
    """TAC or difference per channel on the split's poisoned samples, for --neuron_order tac/difference."""
    if how not in ("tac", "difference"):
        return None
    if not ctx.split.poison.any():
        raise UserError(f"--neuron_order {how} needs poisoned samples in the split; {ctx.split.name} has none; "
                        f"use --visual_dataset bd_train, bd_test or mixed, or --neuron_order index/random")
    poisoned = ctx.split.only_poisoned()
    paired = compute_paired_activations(model, ctx.loader(poisoned), ctx.loader(poisoned.clean_twin()), [layer],
                                        ctx.device, desc=how)
    return paired.tac[layer] if how == "tac" else paired.difference(layer)


def short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def draw_pages(ctx, channels, values, positions, order_label, order_vals, title: str) -> list:
    """Rows of top images, at most NEURONS_PER_PAGE rows and IMAGES_SHOWN columns per figure."""
    pixels = ctx.split.pixels()
    split, names = ctx.split, ctx.class_names
    shown_images = min(values.shape[1], IMAGES_SHOWN)
    pages = math.ceil(len(channels) / NEURONS_PER_PAGE)
    written = []
    for page in range(min(pages, MAX_PAGES)):
        rows = channels[page * NEURONS_PER_PAGE:(page + 1) * NEURONS_PER_PAGE]
        cols = shown_images
        fig, axes = plt.subplots(len(rows), cols, figsize=(max(4.2, 1.3 * cols + 1.2), 1.65 * len(rows) + 0.9),
                                 squeeze=False)
        for r, channel in enumerate(rows):
            for j in range(cols):
                ax = axes[r, j]
                pos = int(positions[channel, j])
                poisoned = bool(split.poison[pos])
                label = short(names[int(split.labels[pos])])
                text = f"{'poisoned → ' if poisoned else ''}{label}\n#{split.indices[pos]}  {values[channel, j]:.3g}"
                show_image(ax, pixels[pos][0], text, color=POISON_COLOR if poisoned else "black", fontsize=6.5)
                if poisoned:
                    for spine in ax.spines.values():
                        spine.set_edgecolor(POISON_COLOR); spine.set_linewidth(2)
            value = f"\n{order_label} {order_vals[channel]:.3g}" if order_vals is not None else ""
            axes[r, 0].set_ylabel(f"channel {channel}{value}", fontsize=8, rotation=0, ha="right", va="center",
                                  labelpad=8)
        note = f"; first {cols} of {values.shape[1]} per channel shown" if cols < values.shape[1] else ""
        page_note = f" (page {page + 1} of {min(pages, MAX_PAGES)})" if pages > 1 else ""
        fig.suptitle(f"{title}{page_note}\ntitles: label, dataset index, activation; red: poisoned{note}", fontsize=9)
        fig.tight_layout()
        name = "act_top_images" if pages == 1 else f"act_top_images_{page + 1}"
        written.append(ctx.out.save_figure(fig, name))
    return written


def run(args) -> dict:
    for flag in ("num_neuron", "num_image"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")
    with load_context(args, "act", split=None) as ctx:
        if args.visual_dataset == AUTO:
            args.visual_dataset = auto_split(ctx.record, ("bd_train", "mixed", "clean_test"))
        ctx.split = ctx.get_split(args.visual_dataset, n_sub=args.n_sub, c_sub=args.c_sub)
        model, layer = ctx.model, ctx.layer_name()
        order_vals = order_values(ctx, model, layer, args.neuron_order)
        values, positions = compute_top_images(model, ctx.loader(ctx.split), layer, ctx.device, args.num_image,
                                               args.reduce)
        num_channels = values.shape[0]
        order = neuron_order(args.neuron_order, num_channels, args.seed, tac=order_vals, difference=order_vals)
        channels = order[: min(args.num_neuron, num_channels)]
        split = ctx.split
        rows = []
        for rank_of_neuron, channel in enumerate(channels, start=1):
            for rank in range(values.shape[1]):
                pos = int(positions[channel, rank])
                rows.append([int(channel), rank_of_neuron, rank + 1, int(split.indices[pos]), float(values[channel, rank]),
                             int(split.poison[pos]), int(split.labels[pos]), int(split.original_labels[pos])])
        ctx.out.save_csv("act_top_images", rows, header=["neuron", "neuron_rank", "rank", "dataset_index", "activation",
                                                          "poison", "label", "original_label"])
        order_label = {"tac": "TAC", "difference": "diff."}.get(args.neuron_order, "")
        title = (f"{ctx.model_label} model, {layer}: top {values.shape[1]} images of {ctx.split.name} "
                 f"({len(ctx.split)} samples) per channel, channels by {args.neuron_order}")
        figures = draw_pages(ctx, channels, values, positions, order_label, order_vals, title)
        shares = split.poison[positions[channels]].mean(axis=1)
        summary = {"split": split.name, "samples": len(split), "layer": layer, "model": ctx.model_label,
                   "neuron_order": args.neuron_order, "neurons": [int(c) for c in channels],
                   "images_per_neuron": int(values.shape[1]),
                   "poisoned_share_in_split": float(split.poison.mean()),
                   "poisoned_share_in_top_images": float(shares.mean()),
                   "poisoned_share_per_neuron": {int(c): float(s) for c, s in zip(channels, shares)},
                   "figures": figures}
        if len(channels) > MAX_PAGES * NEURONS_PER_PAGE:
            summary["note"] = (f"figures show the first {MAX_PAGES * NEURONS_PER_PAGE} of {len(channels)} channels; "
                               f"act_top_images.csv lists all")
            print(summary["note"])
        print(f"{ctx.model_label} model, {layer}, {len(channels)} channels by {args.neuron_order}: "
              f"{shares.mean():.1%} of their top {values.shape[1]} images are poisoned "
              f"(poisoned share of {split.name}: {split.poison.mean():.1%})")
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="auto")  # resolved in run()
