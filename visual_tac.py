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
import numpy as np

from utils.activations import AUTO, auto_split, compute_paired_activations, poisoned_split
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.layers import named_layers, resolve_layers
from utils.plotting import plt

DEMO_ARGS = ["--normalize_by_layer"]


def add_arguments(parser):
    parser.add_argument("--layers", help="comma-separated layer names (default: every Conv, BatchNorm and Linear layer)")
    parser.add_argument("--normalize_by_layer", action="store_true",
                        help="divide each layer's TAC by its maximum (heat grid and tac_normalized column)")
    parser.add_argument("--top", type=int, default=15, help="how many channels with the largest TAC to name")


def compute_tac(model, poisoned_loader, clean_loader, layers, device, normalize_by_layer: bool = False) -> dict:
    """{layer: TAC per channel}, from one paired pass; normalised by each layer's maximum if asked."""
    paired = compute_paired_activations(model, poisoned_loader, clean_loader, layers, device, desc="TAC")
    tac = {name: paired.tac[name] for name in layers}
    if normalize_by_layer:
        tac = {name: normalized(values) for name, values in tac.items()}
    return tac


def normalized(values: np.ndarray) -> np.ndarray:
    top = float(np.max(values)) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def top_channels(tac: dict, count: int) -> list:
    """[(layer, channel, value)] of the largest values over all layers."""
    flat = [(layer, int(c), float(v)) for layer, values in tac.items() for c, v in enumerate(values)]
    return sorted(flat, key=lambda item: -item[2])[:count]


def heat_matrix(layers, tac: dict) -> np.ndarray:
    """Layers x channels (padded with NaN to the widest layer)."""
    width = max(len(tac[name]) for name in layers)
    matrix = np.full((len(layers), width), np.nan)
    for row, name in enumerate(layers):
        matrix[row, :len(tac[name])] = tac[name]
    return matrix


def draw_heat_grid(ax, layers, shown: dict, marked: list, vmax: float, title: str, label: str, clipped: bool):
    matrix = heat_matrix(layers, shown)
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                      interpolation="nearest")
    rows = {name: i for i, name in enumerate(layers)}
    for rank, (layer, channel, _) in enumerate(marked, start=1):
        ax.plot(channel, rows[layer], "o", ms=7, mfc="none", mec="#00c8ff", mew=1.4)
        ax.annotate(str(rank), (channel, rows[layer]), xytext=(4, 2), textcoords="offset points", fontsize=6,
                    color="#0090c0")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=6 if len(layers) > 25 else 7)
    ax.set_xlabel("channel")
    ax.set_title(title, fontsize=10)
    plt.colorbar(image, ax=ax, fraction=0.03, pad=0.01, extend="max" if clipped else "neither").set_label(label,
                                                                                                        fontsize=8)


def draw_top_bars(ax, top: list, title: str):
    names = [f"{layer} #{channel}" for layer, channel, _ in top][::-1]
    values = [value for _, _, value in top][::-1]
    ax.barh(range(len(values)), values, color="#b5367a")
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels([f"{len(top) - i}. {n}" for i, n in enumerate(names)], fontsize=7)
    ax.set_xlabel("TAC")
    ax.set_title(title, fontsize=10)


def run(args) -> dict:
    if args.top < 1:
        raise UserError(f"--top {args.top} must be at least 1")
    with load_context(args, "tac", split=None, needs_poison=True) as ctx:
        if args.visual_dataset == AUTO:
            args.visual_dataset = auto_split(ctx.record, ("bd_train", "bd_test"))
        ctx.split = poisoned_split(ctx, args.visual_dataset, "TAC")
        attack = ctx.models["attack"]
        layers = resolve_layers(attack, args.layers) if args.layers else named_layers(attack)
        for model in ctx.models.values():
            resolve_layers(model, layers)
        poisoned_loader, clean_loader = ctx.loader(ctx.split), ctx.loader(ctx.split.clean_twin())
        raw = {label: compute_tac(model, poisoned_loader, clean_loader, layers, ctx.device)
               for label, model in ctx.models.items()}
        shown = {label: {n: normalized(v) for n, v in tac.items()} if args.normalize_by_layer else tac
                 for label, tac in raw.items()}
        pairs = len(ctx.split)
        summary = {"split": ctx.split.name, "pairs": pairs, "layers": len(layers),
                   "normalize_by_layer": bool(args.normalize_by_layer)}
        rows, layer_rows = [], []
        for label, tac in raw.items():
            for name in layers:
                for channel, value in enumerate(tac[name]):
                    row = [label, name, channel, float(value)]
                    if args.normalize_by_layer:
                        row.append(float(shown[label][name][channel]))
                    rows.append(row)
                layer_rows.append([label, name, len(tac[name]), float(tac[name].mean()), float(tac[name].max()),
                                   int(tac[name].argmax())])
            top = top_channels(tac, args.top)
            summary[f"top_channels_{label}"] = [{"layer": l, "neuron": c, "tac": v} for l, c, v in top]
            summary[f"max_tac_{label}"] = top[0][2]
            means = {name: float(tac[name].mean()) for name in layers}
            summary[f"layer_with_largest_mean_tac_{label}"] = max(means, key=means.get)
            print(f"{label} model: TAC over {pairs} poisoned/clean pairs of {ctx.split.name}, {len(layers)} layers; "
                  f"largest: " + ", ".join(f"{l} #{c} = {v:.3f}" for l, c, v in top[:3]))
        header = ["model", "layer", "neuron", "tac"] + (["tac_normalized"] if args.normalize_by_layer else [])
        ctx.out.save_csv("tac", rows, header=header)
        ctx.out.save_csv("tac_layers", layer_rows, header=["model", "layer", "channels", "mean_tac", "max_tac",
                                                           "argmax_neuron"])
        draw_figure(ctx, layers, raw, shown, args)
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


def draw_figure(ctx, layers, raw: dict, shown: dict, args):
    height = max(4.0, 0.16 * len(layers) + 1.8)
    fig, axes = plt.subplots(len(raw), 2, figsize=(16, height * len(raw)), squeeze=False,
                             gridspec_kw={"width_ratios": [3.2, 1]})
    label = "TAC / layer maximum" if args.normalize_by_layer else "TAC"
    clipped = False
    if args.normalize_by_layer:
        vmax = 1.0
    else:
        # A few channels (often the logits) change far more than the rest; the colour scale ends
        # at the 99.5th percentile so that the other layers do not all look alike.
        values = np.concatenate([np.concatenate(list(s.values())) for s in shown.values()])
        vmax, top = float(np.percentile(values, 99.5)), float(values.max())
        clipped = top > vmax * 1.05
        vmax = vmax if clipped and vmax > 0 else top
        if clipped:
            label += f" (scale ends at the 99.5th percentile, {vmax:.3g}; largest {top:.3g})"
    for (model_label, tac), (ax_heat, ax_bars) in zip(raw.items(), axes):
        top = top_channels(tac, args.top)
        draw_heat_grid(ax_heat, layers, shown[model_label], top, vmax,
                       f"{model_label} model: TAC per channel ({len(ctx.split)} poisoned/clean pairs, "
                       f"{ctx.split.name}); circles: the top {len(top)}", label, clipped)
        draw_top_bars(ax_bars, top, f"{model_label} model: largest TAC")
    fig.suptitle(f"Trigger Activation Change, {ctx.record.name}"
                 + (" (each layer divided by its maximum)" if args.normalize_by_layer else ""), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (height * len(raw))))
    ctx.out.save_figure(fig, "tac")


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="auto")  # resolved in run()
