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

from backdoor_lens.analysis import Analysis, flag_settings
from backdoor_lens.args import integer_in
from backdoor_lens.errors import UserError
from backdoor_lens.plot.activations import fm_image_figure, fm_pair_figure
from backdoor_lens.plot.base import POISON_COLOR
from backdoor_lens.stats.activations import compare_twins, descending
from backdoor_lens.stats.features import layer_output

NO_PAIR = "left out: the split has no poisoned samples (use --visual_dataset bd_test)"


def add_arguments(parser):
    parser.add_argument("--index", type=int, help="dataset index of the image (default: a random one, --seed)")
    parser.add_argument("--num_maps", type=integer_in(1), default=16, help="feature maps shown per figure")


@dataclass(frozen=True)
class Settings:
    index: int | None  # dataset index of the image; None: a random one
    num_maps: int
    seed: int


@dataclass
class PairMaps:
    """A poisoned sample and its clean twin inside the layer."""

    index: int  # dataset index
    label: int  # the served (attack) label
    original: int
    poisoned_image: torch.Tensor  # C x H x W in pixel space
    clean_image: torch.Tensor
    poisoned: np.ndarray  # the maps, C x H x W
    clean: np.ndarray
    poisoned_mean: np.ndarray  # per channel: the mean of its map
    clean_mean: np.ndarray
    change: np.ndarray  # per channel: 1/P sum_p |poisoned - clean|
    channels: np.ndarray  # the --num_maps channels the trigger changes most


@dataclass
class FmResult:
    split: str
    model: str
    layer: str
    index: int  # dataset index of the chosen image
    label: int
    original: int
    poisoned: bool
    image: torch.Tensor  # C x H x W in pixel space
    maps: np.ndarray  # C x H x W
    means: np.ndarray  # per channel: the mean of its map
    channels: np.ndarray  # the --num_maps channels with the largest mean
    pair: PairMaps | None  # None when the split has no poisoned sample


def as_maps(output: np.ndarray) -> np.ndarray:
    """C x H x W; a vector output (Linear) becomes C maps of one pixel."""
    return output.reshape(output.shape[0], 1, 1) if output.ndim == 1 else output.reshape(output.shape[0],
                                                                                        output.shape[1], -1)


def choose_position(split, index, rng) -> int:
    """The split position of dataset index `index`, or a random position (drawn from rng) when None."""
    if index is None:
        return int(rng.integers(len(split)))
    found = np.flatnonzero(split.indices == index)
    if len(found) == 0:
        shown = ", ".join(str(i) for i in split.indices[:5])
        raise UserError(f"--index {index} is not in split {split.name} ({len(split)} samples with dataset indices "
                        f"{shown}, ...); choose one of them or another --visual_dataset")
    return int(found[0])


def compute_pair(ctx, model, split, position: int, layer: str, num_maps: int) -> PairMaps:
    """The maps of the poisoned sample at `position` and of its clean twin (one paired pass)."""
    one = split.take([position])
    paired = compare_twins({"model": model}, one, ctx.loader, [layer], ctx.device, per_unit=True,
                           desc="poisoned vs clean twin")["model"]
    change = paired.tac[layer]
    return PairMaps(int(one.indices[0]), int(one.labels[0]), int(one.original_labels[0]), one.pixels()[0][0],
                    one.clean_twin().pixels()[0][0], as_maps(paired.poisoned_unit_mean[layer]),
                    as_maps(paired.clean_unit_mean[layer]), paired.poisoned_mean[layer], paired.clean_mean[layer],
                    change, descending(change, num_maps))


def compute(ctx, settings: Settings) -> FmResult:
    split, model, layer = ctx.use_split(), ctx.model, ctx.layer_name()
    rng = np.random.default_rng(settings.seed)
    position = choose_position(split, settings.index, rng)
    x, label, original, poisoned, index = split[position]
    maps = as_maps(layer_output(model, x.unsqueeze(0), layer, ctx.device)[0])
    means = maps.reshape(len(maps), -1).mean(1)
    pair_position = position if poisoned else (int(rng.choice(np.flatnonzero(split.poison)))
                                               if split.poison.any() else None)
    pair = None if pair_position is None else compute_pair(ctx, model, split, pair_position, layer, settings.num_maps)
    return FmResult(split.name, ctx.model_label, layer, index, label, original, bool(poisoned),
                    split.pixels()[position][0], maps, means, descending(means, settings.num_maps), pair)


def write(result: FmResult, ctx) -> dict:
    names, layer, model, channels = ctx.class_names, result.layer, result.model, result.channels
    label, original, index = result.label, result.original, result.index
    caption = (f"poisoned: {names[original]} served as {names[label]}" if result.poisoned
               else f"label {names[label]}") + f"\ndataset index {index}"
    ctx.out.save_figure(fm_image_figure(result.image, result.maps, result.means, channels, caption,
                                        POISON_COLOR if result.poisoned else "black", f"{model} model, {layer}"),
                        "fm_image")
    ctx.out.save_csv("fm_image", [[c, float(result.means[c])] for c in range(len(result.maps))],
                     header=["neuron", "mean_activation"])
    summary = {"split": result.split, "layer": layer, "model": model, "dataset_index": index,
               "poisoned": result.poisoned, "label": label, "map_shape": list(result.maps.shape),
               "channels_shown": [int(c) for c in channels]}
    served = (f"poisoned, {names[original]} served as {names[label]}" if result.poisoned
              else f"clean, label {names[label]}")
    print(f"{model} model, {layer}: feature maps of {result.split} image #{index} ({served}); strongest channel "
          f"{channels[0]} (mean {result.means[channels[0]]:.3f})")
    pair = result.pair
    if pair is None:
        summary["pair"] = NO_PAIR
        print(f"poisoned vs clean figure {NO_PAIR}")
        return summary
    changed = pair.channels
    caption = f"dataset index {pair.index}, label {names[pair.original]}, served as {names[pair.label]}"
    ctx.out.save_figure(fm_pair_figure(pair.poisoned_image, pair.clean_image, pair.poisoned, pair.clean, pair.change,
                                       changed, f"{model} model, {layer}", caption), "fm_poisoned_vs_clean")
    ctx.out.save_csv("fm_poisoned_vs_clean",
                     [[c, float(pair.poisoned_mean[c]), float(pair.clean_mean[c]), float(pair.change[c])]
                      for c in range(len(pair.change))],
                     header=["neuron", "poisoned_mean", "clean_mean", "mean_abs_change"])
    summary.update({"pair_dataset_index": pair.index, "channels_changed_most": [int(c) for c in changed],
                    "largest_mean_abs_change": float(pair.change[changed[0]]),
                    "mean_abs_change": float(pair.change.mean())})
    print(f"poisoned #{pair.index} vs its clean twin: mean |change| over channels {pair.change.mean():.3f}, "
          f"largest channel {changed[0]} ({pair.change[changed[0]]:.3f})")
    return summary


ANALYSIS = Analysis(
    name="fm", title="Feature maps", order=8,
    guide="A layer's feature maps for a clean image and for a poisoned image with its difference; look for maps "
          "lighting up at the trigger.",
    shows="the feature maps of a layer for one image, and for a poisoned image next to its clean twin",
    compute=compute, write=write, settings=flag_settings(Settings), add_arguments=add_arguments,
    splits=("bd_test", "clean_test"), default_split="auto", demo_args=("--num_maps", "16"))
