"""Trigger Activation Change (TAC): how much each channel of each layer reacts to the trigger.

For channel c of a layer, over the N poisoned samples of the split and their clean twins (the
same images served without the trigger) and the P positions of the channel's map:

    TAC_c = 1/(N P) sum_n sum_p |a_c,p(poisoned_n) - a_c,p(clean twin_n)|

Every Conv, BatchNorm and Linear layer (or --layers) is measured in one pass, as running sums
(memory independent of the number of samples). --normalize_by_layer divides each layer's TAC by
its largest value, so that layers of different scale can be compared on the heat grid.
Split: bd_train when the record has it, else bd_test (--visual_dataset to choose); only its
poisoned samples are used, --n_sub caps their number. With a defense, attack and defense side by side.
"""
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis, flag_settings
from backdoor_lens.args import integer_in
from backdoor_lens.models.layers import named_layers, resolve_layers
from backdoor_lens.plot.activations import tac_figure
from backdoor_lens.report.numbers import channels_text, read_summary
from backdoor_lens.stats.activations import compare_twins


def add_arguments(parser):
    parser.add_argument("--layers", help="comma-separated layer names (default: every Conv, BatchNorm and Linear layer)")
    parser.add_argument("--normalize_by_layer", action="store_true",
                        help="divide each layer's TAC by its maximum (heat grid and tac_normalized column)")
    parser.add_argument("--top", type=integer_in(1), default=15, help="how many channels with the largest TAC to name")


@dataclass(frozen=True)
class Settings:
    layers: str | None  # comma-separated names; None: every Conv, BatchNorm and Linear layer
    normalize_by_layer: bool
    top: int


@dataclass
class TacResult:
    record: str
    split: str
    pairs: int
    layers: list
    normalize_by_layer: bool
    tac: dict  # {model label: {layer: TAC per channel}}
    shown: dict  # the same, each layer divided by its maximum with --normalize_by_layer
    top: dict  # {model label: [(layer, channel, TAC)]}, largest first


def normalized(values: np.ndarray) -> np.ndarray:
    """values / max(values); zeros when the maximum is not positive."""
    top = float(np.max(values)) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def top_channels(tac: dict, count: int) -> list:
    """[(layer, channel, value)] of the largest values over all layers."""
    flat = [(layer, int(c), float(v)) for layer, values in tac.items() for c, v in enumerate(values)]
    return sorted(flat, key=lambda item: -item[2])[:count]


def compute(ctx, settings: Settings) -> TacResult:
    split = ctx.poisoned_split(ctx.split_name(), "TAC")
    attack = ctx.models["attack"]
    layers = resolve_layers(attack, settings.layers) if settings.layers else named_layers(attack)
    paired = compare_twins(ctx.models, split, ctx.loader, layers, ctx.device, desc="TAC")
    tac = {label: {name: result.tac[name] for name in layers} for label, result in paired.items()}
    shown = {label: {n: normalized(v) for n, v in values.items()} for label, values in tac.items()} \
        if settings.normalize_by_layer else tac
    return TacResult(ctx.record.name, split.name, len(split), layers, settings.normalize_by_layer, tac, shown,
                     {label: top_channels(values, settings.top) for label, values in tac.items()})


def write(result: TacResult, ctx) -> dict:
    layers, normalize = result.layers, result.normalize_by_layer
    summary = {"split": result.split, "pairs": result.pairs, "layers": len(layers), "normalize_by_layer": normalize}
    rows, layer_rows = [], []
    for label, tac in result.tac.items():
        for name in layers:
            for channel, value in enumerate(tac[name]):
                rows.append([label, name, channel, float(value)]
                            + ([float(result.shown[label][name][channel])] if normalize else []))
            layer_rows.append([label, name, len(tac[name]), float(tac[name].mean()), float(tac[name].max()),
                               int(tac[name].argmax())])
        top = result.top[label]
        summary[f"top_channels_{label}"] = [{"layer": l, "neuron": c, "tac": v} for l, c, v in top]
        summary[f"max_tac_{label}"] = top[0][2]
        means = {name: float(tac[name].mean()) for name in layers}
        summary[f"layer_with_largest_mean_tac_{label}"] = max(means, key=means.get)
        print(f"{label} model: TAC over {result.pairs} poisoned/clean pairs of {result.split}, {len(layers)} layers; "
              f"largest: " + ", ".join(f"{l} #{c} = {v:.3f}" for l, c, v in top[:3]))
    header = ["model", "layer", "neuron", "tac"] + (["tac_normalized"] if normalize else [])
    ctx.out.save_csv("tac", rows, header=header)
    ctx.out.save_csv("tac_layers", layer_rows, header=["model", "layer", "channels", "mean_tac", "max_tac",
                                                       "argmax_neuron"])
    # tac_figure lays itself out in inches: no cropping draw needed.
    ctx.out.save_figure(tac_figure(layers, result.shown, result.top, normalize, result.pairs, result.split,
                                   result.record), "tac", crop=False)
    return summary


def key_numbers(folder) -> list:
    s = read_summary(folder)
    return [(f"top TAC channels ({k[len('top_channels_'):]})", channels_text(v, "tac"))
            for k, v in s.items() if k.startswith("top_channels_") and v]


ANALYSIS = Analysis(
    name="tac", title="Trigger activation change", order=7,
    guide="Mean |activation(poisoned) - activation(clean twin)| per channel; the bright channels carry the trigger.",
    shows="the trigger activation change of every channel of every layer",
    compute=compute, write=write, settings=flag_settings(Settings), add_arguments=add_arguments, key_numbers=key_numbers,
    splits=("bd_train", "bd_test"), default_split="auto", needs_poison=True, compares=True,
    demo_args=("--normalize_by_layer",), quick_args=("--n_sub", "12", "--layers", "layer3.1.conv2,layer4.1.conv2"))
