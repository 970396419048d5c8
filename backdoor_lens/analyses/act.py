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
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis
from backdoor_lens.args import integer_in
from backdoor_lens.errors import UserError
from backdoor_lens.plot.activations import ACT_NEURONS_SHOWN, act_pages
from backdoor_lens.record.splits import Split
from backdoor_lens.stats.activations import (NEURON_ORDERS, TWIN_ORDERS, ChannelRanking, compute_top_activations,
                                             neuron_order, rank_channels)


def add_arguments(parser):
    parser.add_argument("--num_neuron", type=integer_in(1), default=8, help="how many channels to show")
    parser.add_argument("--num_image", type=integer_in(1), default=8, help="top-activating images per channel")
    parser.add_argument("--neuron_order", choices=NEURON_ORDERS, default="index",
                        help="which channels: by index, by TAC, by poisoned-minus-clean activation, or random (--seed)")
    parser.add_argument("--reduce", choices=("mean", "max"), default="mean",
                        help="a channel's activation for one image: mean or max over its positions")


@dataclass(frozen=True)
class Settings:
    num_neuron: int
    num_image: int
    neuron_order: str
    reduce: str
    seed: int


def settings(args) -> Settings:
    return Settings(args.num_neuron, args.num_image, args.neuron_order, args.reduce, args.seed)


@dataclass
class ActResult:
    split: Split  # the analysed split: its pixels, labels and poison flags title the images
    model: str
    layer: str
    neuron_order: str
    channels: np.ndarray  # the channels shown, in --neuron_order
    values: np.ndarray  # C x k: every channel's k largest activations, descending
    positions: np.ndarray  # C x k: the split positions of those samples
    poisoned_shares: np.ndarray  # per shown channel: the poisoned share of its top k
    ranking: ChannelRanking | None  # with --neuron_order tac or difference


def compute(ctx, settings: Settings) -> ActResult:
    split = ctx.use_split()
    model, layer = ctx.model, ctx.layer_name()
    ranking = None
    if settings.neuron_order in TWIN_ORDERS:
        if not split.poison.any():
            raise UserError(f"--neuron_order {settings.neuron_order} needs poisoned samples in the split; "
                            f"{split.name} has none; use --visual_dataset bd_train, bd_test or mixed, "
                            f"or --neuron_order index/random")
        poisoned = split.only_poisoned()
        ranking = rank_channels(model, ctx.loader(poisoned), ctx.loader(poisoned.clean_twin()), layer, ctx.device,
                                by=settings.neuron_order)
    top = compute_top_activations(model, ctx.loader(split), [layer], ctx.device, settings.num_image,
                                  reduce=settings.reduce, desc="top images")
    values, positions = top.values[layer], top.positions[layer]
    order = ranking.channels if ranking else neuron_order(settings.neuron_order, values.shape[0], settings.seed)
    channels = order[: min(settings.num_neuron, values.shape[0])]
    return ActResult(split, ctx.model_label, layer, settings.neuron_order, channels, values, positions,
                     split.poison[positions[channels]].mean(axis=1), ranking)


def write(result: ActResult, ctx) -> dict:
    split, channels, values, positions = result.split, result.channels, result.values, result.positions
    rows = []
    for rank_of_neuron, channel in enumerate(channels, start=1):
        for rank in range(values.shape[1]):
            pos = int(positions[channel, rank])
            rows.append([int(channel), rank_of_neuron, rank + 1, int(split.indices[pos]), float(values[channel, rank]),
                         int(split.poison[pos]), int(split.labels[pos]), int(split.original_labels[pos])])
    ctx.out.save_csv("act_top_images", rows, header=["neuron", "neuron_rank", "rank", "dataset_index", "activation",
                                                      "poison", "label", "original_label"])
    order_label = {"tac": "TAC", "difference": "diff."}.get(result.neuron_order, "")
    title = (f"{result.model} model, {result.layer}: top {values.shape[1]} images of {split.name} "
             f"({len(split)} samples) per channel, channels by {result.neuron_order}")
    pages = act_pages(split.pixels(), split.poison, split.labels, split.indices, ctx.class_names, channels, values,
                      positions, order_label, result.ranking.values if result.ranking else None, title)
    names = ["act_top_images"] if len(pages) == 1 else [f"act_top_images_{k}" for k in range(1, len(pages) + 1)]
    figures = [ctx.out.save_figure(fig, name) for fig, name in zip(pages, names)]
    shares = result.poisoned_shares
    summary = {"split": split.name, "samples": len(split), "layer": result.layer, "model": result.model,
               "neuron_order": result.neuron_order, "neurons": [int(c) for c in channels],
               "images_per_neuron": int(values.shape[1]),
               "poisoned_share_in_split": float(split.poison.mean()),
               "poisoned_share_in_top_images": float(shares.mean()),
               "poisoned_share_per_neuron": {int(c): float(s) for c, s in zip(channels, shares)},
               "figures": figures}
    if len(channels) > ACT_NEURONS_SHOWN:
        summary["note"] = (f"figures show the first {ACT_NEURONS_SHOWN} of {len(channels)} channels; "
                           f"act_top_images.csv lists all")
        print(summary["note"])
    print(f"{result.model} model, {result.layer}, {len(channels)} channels by {result.neuron_order}: "
          f"{shares.mean():.1%} of their top {values.shape[1]} images are poisoned "
          f"(poisoned share of {split.name}: {split.poison.mean():.1%})")
    return summary


ANALYSIS = Analysis(
    name="act", order=5, title="Top-activating images",
    guide="The images that excite each neuron most; red titles are poisoned images, so neurons dominated by red "
          "respond to the trigger.",
    shows="the images that activate chosen neurons most",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments,
    splits=("bd_train", "mixed", "clean_test"), default_split="auto",
    demo_args=("--neuron_order", "tac", "--num_neuron", "6", "--num_image", "8"),
    quick_args=("--n_sub", "24", "--num_neuron", "2", "--num_image", "2"))
