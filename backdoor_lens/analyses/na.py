"""Neuron activation: the mean activation of each channel of a layer on poisoned samples and on
their clean twins (the same images served without the trigger).

For channel c over the N poisoned samples of the split and the P positions of its map:

    poisoned_c = 1/(N P) sum_n sum_p a_c,p(poisoned_n)
    clean_c    = 1/(N P) sum_n sum_p a_c,p(clean twin_n)
    difference_c = poisoned_c - clean_c

--per_unit also does this for every unit (channel, position) without averaging over positions.
Figure: both profiles sorted by clean activation, and their difference; the channels with the
largest difference are named. Split: bd_train when the record has it, else bd_test
(--visual_dataset to choose); only its poisoned samples are used, --n_sub caps their number.
The layer: --target_layer_name (default the model's last conv). With a defense, side by side.
"""
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis
from backdoor_lens.args import integer_in
from backdoor_lens.plot.activations import na_figure
from backdoor_lens.stats.activations import compare_twins, descending


def add_arguments(parser):
    parser.add_argument("--per_unit", action="store_true",
                        help="also compare every unit (channel, position), not only channel means")
    parser.add_argument("--top", type=integer_in(1), default=10,
                        help="how many channels with the largest difference to name")


@dataclass(frozen=True)
class Settings:
    per_unit: bool
    top: int


def settings(args) -> Settings:
    return Settings(bool(args.per_unit), args.top)


@dataclass
class Profile:
    """Mean activation per neuron (channel, or unit) on the poisoned samples and on their clean twins."""

    clean: np.ndarray
    poisoned: np.ndarray
    names: list  # "#c", or "#c@row,col" for a unit
    ranked: np.ndarray  # the neurons by descending poisoned - clean

    @property
    def difference(self) -> np.ndarray:
        return self.poisoned - self.clean


@dataclass
class NaResult:
    record: str
    split: str
    pairs: int
    layer: str
    top: int
    channels: dict  # {model label: Profile of the channels}
    units: dict  # {model label: Profile of the units, channel-major}; empty without --per_unit
    cells: list  # (channel, row, col) of each unit, in the units' order


def unit_cells(shape) -> list:
    """(channel, row, col) of every unit of an output shaped C x H x W (C x L: row 0; C: row and col 0)."""
    positions = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    width = shape[-1] if len(shape) > 1 else 1
    return [(c, p // width, p % width) for c in range(shape[0]) for p in range(positions)]


def profile(clean: np.ndarray, poisoned: np.ndarray, names: list) -> Profile:
    return Profile(clean, poisoned, names, descending(poisoned - clean))


def compute(ctx, settings: Settings) -> NaResult:
    split = ctx.poisoned_split(ctx.split_name(), "neuron activation")
    layer = ctx.layer_name(ctx.models["attack"])
    paired = compare_twins(ctx.models, split, ctx.loader, [layer], ctx.device, per_unit=settings.per_unit,
                           desc="neuron activation")
    channels, units, cells = {}, {}, []
    for label, result in paired.items():
        clean = result.clean_mean[layer]
        channels[label] = profile(clean, result.poisoned_mean[layer], [f"#{c}" for c in range(len(clean))])
        if settings.per_unit:
            shape = result.shapes[layer]
            cells = unit_cells(shape)
            names = [f"#{c}@{r},{col}" if len(shape) > 1 else f"#{c}" for c, r, col in cells]
            units[label] = profile(result.clean_unit_mean[layer].ravel(), result.poisoned_unit_mean[layer].ravel(),
                                   names)
    return NaResult(ctx.record.name, split.name, len(split), layer, settings.top, channels, units, cells)


def write(result: NaResult, ctx) -> dict:
    layer, top = result.layer, result.top
    summary = {"split": result.split, "pairs": result.pairs, "layer": layer}
    rows, unit_rows = [], []
    for label, channels in result.channels.items():
        clean, poisoned, difference = channels.clean, channels.poisoned, channels.difference
        rank = np.empty(len(difference), int)
        rank[channels.ranked] = np.arange(1, len(difference) + 1)
        rows += [[label, c, clean[c], poisoned[c], difference[c], rank[c]] for c in range(len(clean))]
        best = channels.ranked[:top]
        summary[f"top_neurons_{label}"] = [{"neuron": int(c), "clean_mean": float(clean[c]),
                                            "poisoned_mean": float(poisoned[c]),
                                            "difference": float(difference[c])} for c in best]
        summary[f"mean_abs_difference_{label}"] = float(np.abs(difference).mean())
        summary[f"share_of_neurons_more_active_when_poisoned_{label}"] = float((difference > 0).mean())
        print(f"{label} model, {layer}, {result.pairs} poisoned/clean pairs: mean |poisoned - clean| = "
              f"{np.abs(difference).mean():.4f}; largest increase: "
              + ", ".join(f"#{c} ({difference[c]:+.3f})" for c in best[:5]))
        if label in result.units:
            units = result.units[label]
            cu, pu, du = units.clean, units.poisoned, units.difference
            unit_rows += [[label, c, r, col, cu[u], pu[u], du[u]] for u, (c, r, col) in enumerate(result.cells)]
            summary[f"top_units_{label}"] = [{"unit": units.names[u], "difference": float(du[u])}
                                             for u in units.ranked[:top]]
    ctx.out.save_csv("na_neurons", rows, header=["model", "neuron", "clean_mean", "poisoned_mean", "difference",
                                                 "rank_by_difference"])
    if result.units:
        ctx.out.save_csv("na_units", unit_rows, header=["model", "neuron", "row", "col", "clean_mean",
                                                        "poisoned_mean", "difference"])
    for name, profiles, what in (("na", result.channels, "channels"), ("na_units", result.units,
                                                                        "units (channel, position)")):
        if profiles:
            shown = {label: (p.clean, p.poisoned, p.names, p.ranked[:top]) for label, p in profiles.items()}
            # tight_layout has fitted everything inside the figure: no cropping draw needed.
            ctx.out.save_figure(na_figure(shown, layer, result.pairs, result.split, result.record, what), name,
                                crop=False)
    return summary


ANALYSIS = Analysis(
    name="na", title="Neuron activation", order=4,
    guide="Channels where the poisoned profile rises far above the clean one respond to the trigger; "
          "the CSV names them.",
    shows="the mean activation of each channel for poisoned images and for their clean twins",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments,
    splits=("bd_train", "bd_test"), default_split="auto", needs_poison=True, compares=True,
    demo_args=("--per_unit",), quick_args=("--n_sub", "12"))
