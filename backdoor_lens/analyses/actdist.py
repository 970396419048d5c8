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
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis, flag_settings
from backdoor_lens.args import integer_in
from backdoor_lens.models.layers import named_layers, resolve_layers
from backdoor_lens.plot.activations import actdist_layer_pages, actdist_overview
from backdoor_lens.stats.activations import class_makeup, compute_top_activations, sample_groups, topk_size


def add_arguments(parser):
    parser.add_argument("--layers", help="comma-separated layer names (default: every Conv, BatchNorm and Linear layer)")
    parser.add_argument("--max_neurons", type=integer_in(1), default=32,
                        help="channels shown per layer (those with the largest poisoned share; the CSV has all)")
    parser.add_argument("--reduce", choices=("mean", "max"), default="mean",
                        help="a channel's activation for one image: mean or max over its positions")


@dataclass(frozen=True)
class Settings:
    """--layers (None: every Conv, BatchNorm and Linear layer), --max_neurons shown per layer, --reduce."""
    layers: str | None
    max_neurons: int
    reduce: str


@dataclass
class ActdistResult:
    split: str
    samples: int
    model: str
    layers: list
    k: int
    num_classes: int
    groups: list  # the group names: the classes, then "poisoned" (and "poisoned, label kept")
    shares: dict  # {layer: C x G shares of each group among each channel's top-k samples}
    base_rate: float  # the poisoned share of the split
    poisoned: np.ndarray  # per layer: the mean over channels of the poisoned share of the top-k
    largest: np.ndarray  # per layer: the largest poisoned share of a channel
    purity: np.ndarray  # per layer: the mean over channels of the share of the most common group
    mostly_poisoned: dict  # {layer: how many channels have a top-k more than half poisoned}
    max_neurons: int


def compute(ctx, settings: Settings) -> ActdistResult:
    split, model = ctx.use_split(), ctx.model
    layers = resolve_layers(model, settings.layers) if settings.layers else named_layers(model)
    num_classes = ctx.num_classes
    groups, names = sample_groups(split.labels, split.original_labels, split.poison, num_classes, ctx.class_names,
                                  ctx.target_class)
    k = min(topk_size(split.labels, split.poison), len(split))
    top = compute_top_activations(model, ctx.loader(split), layers, ctx.device, k, reduce=settings.reduce,
                                  desc="activation distribution")
    shares = {name: class_makeup(top.positions[name], groups, len(names)) for name in layers}
    poisoned_share = [shares[n][:, num_classes:].sum(1) for n in layers]
    return ActdistResult(split.name, len(split), ctx.model_label, layers, k, num_classes, names, shares,
                         float(split.poison.mean()), np.array([s.mean() for s in poisoned_share]),
                         np.array([s.max() for s in poisoned_share]),
                         np.array([shares[n].max(1).mean() for n in layers]),
                         {n: int((s > 0.5).sum()) for n, s in zip(layers, poisoned_share)}, settings.max_neurons)


def write(result: ActdistResult, ctx) -> dict:
    layers, shares, k, num_classes = result.layers, result.shares, result.k, result.num_classes
    rows = [[layer, c, k] + shares[layer][c].tolist() for layer in layers for c in range(len(shares[layer]))]
    ctx.out.save_csv("actdist", rows, header=["layer", "neuron", "k"] + [f"share_{n}" for n in result.groups])
    described = f"{result.split} ({result.samples} samples)"
    pages = actdist_layer_pages(layers, shares, result.groups, num_classes, result.max_neurons, result.base_rate, k,
                                f"Activation distribution, {result.model} model, {described}")
    for page, fig in enumerate(pages, start=1):
        ctx.out.save_figure(fig, f"actdist_layers_{page}" if len(pages) > 1 else "actdist_layers", crop=False)
    ctx.out.save_figure(actdist_overview(layers, result.poisoned, result.largest, result.purity, result.base_rate, k,
                                         f"{result.model} model, {described}: per layer"), "actdist_overview")
    summary = {"split": result.split, "samples": result.samples, "model": result.model, "k": k,
               "layers": len(layers), "poisoned_share_in_split": result.base_rate,
               "mean_poisoned_share_per_layer": dict(zip(layers, result.poisoned.tolist())),
               "mean_purity_per_layer": dict(zip(layers, result.purity.tolist()))}
    if result.base_rate > 0:
        best = layers[int(np.argmax(result.poisoned))]
        mostly = result.mostly_poisoned
        summary.update({"layer_with_largest_poisoned_share": best, "channels_with_mostly_poisoned_top_k": mostly})
        print(f"{result.model} model, {len(layers)} layers, top {k} of {result.samples} samples ({result.split}): "
              f"poisoned share {result.base_rate:.1%} in the split; largest mean share among top-k: {best} "
              f"({result.poisoned.max():.1%}); {sum(mostly.values())} channels with a mostly poisoned top-k")
    else:
        print(f"{result.model} model, {len(layers)} layers, top {k} of {result.samples} samples ({result.split}, "
              f"no poisoned samples): mean class purity of the top-k {result.purity.mean():.1%}")
    return summary


ANALYSIS = Analysis(
    name="actdist", title="Activation distribution", order=6,
    guide="Class make-up of each channel's top-activating images; a large poisoned share marks a backdoor channel.",
    shows="the class make-up of each channel's top-activating images, layer by layer",
    compute=compute, write=write, settings=flag_settings(Settings), add_arguments=add_arguments,
    splits=("bd_train", "mixed", "clean_test"), default_split="auto",
    # The demo reads all of bd_train, as act does: one shared pass serves both.
    quick_args=("--n_sub", "24", "--layers", "layer4.1.conv2,linear"))
