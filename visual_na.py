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
import numpy as np

from utils.activations import AUTO, auto_split, compute_paired_activations, poisoned_split
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.plotting import POISON_COLOR, plt

CLEAN_COLOR = "#1f77b4"
DEMO_ARGS = ["--per_unit"]


def add_arguments(parser):
    parser.add_argument("--per_unit", action="store_true",
                        help="also compare every unit (channel, position), not only channel means")
    parser.add_argument("--top", type=int, default=10, help="how many channels with the largest difference to name")


def compute_neuron_activation(model, poisoned_loader, clean_loader, layer: str, device, per_unit: bool = False):
    """PairedActivations of one layer: poisoned and clean means per channel (and per unit)."""
    return compute_paired_activations(model, poisoned_loader, clean_loader, [layer], device, per_unit=per_unit,
                                      desc="neuron activation")


def top_by_difference(difference: np.ndarray, count: int) -> np.ndarray:
    return np.argsort(-difference, kind="stable")[:count]


def draw_profiles(ax_profile, ax_diff, clean, poisoned, names, top_count: int, title: str, what: str):
    """Both profiles in the order of increasing clean activation; the difference below."""
    order = np.argsort(clean, kind="stable")
    x = np.arange(len(order))
    many = len(order) > 600
    ax_profile.plot(x, clean[order], color=CLEAN_COLOR, lw=1.5, label="clean twins", zorder=3)
    # Dots, not a line: in the clean order the poisoned values jump from one neuron to the next.
    ax_profile.plot(x, poisoned[order], ".", color=POISON_COLOR, ms=1.0 if many else 3.0, alpha=0.6 if many else 0.9,
                    label="poisoned")
    ax_profile.set_ylabel("mean activation")
    ax_profile.set_title(title, fontsize=10)
    ax_profile.legend(fontsize=8, loc="upper left", frameon=False)
    difference = poisoned - clean
    colors = np.where(difference[order] >= 0, POISON_COLOR, CLEAN_COLOR)
    if many:
        values = difference[order]
        ax_diff.fill_between(x, values, 0, where=values >= 0, step="mid", color=POISON_COLOR, alpha=0.7, lw=0)
        ax_diff.fill_between(x, values, 0, where=values < 0, step="mid", color=CLEAN_COLOR, alpha=0.7, lw=0)
    else:
        ax_diff.bar(x, difference[order], width=1.0, color=colors)
    ax_diff.axhline(0, color="black", lw=0.6)
    rank_of = np.empty(len(order), int)
    rank_of[order] = x
    for k, unit in enumerate(top_by_difference(difference, top_count)):
        if k < 8:  # more labels than this collide; the CSV and summary name all of them
            ax_diff.annotate(names[unit], (rank_of[unit], difference[unit]), xytext=(0, 6 + 9 * (k % 3)),
                             textcoords="offset points", fontsize=6.5, ha="center",
                             arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"})
    ax_diff.set_ylabel("poisoned - clean")
    ax_diff.set_xlabel(f"{what} sorted by mean activation on clean twins")
    for ax in (ax_profile, ax_diff):
        ax.set_xlim(-0.5, len(order) - 0.5)


def unit_names(shape) -> list:
    if len(shape) == 1:
        return [f"#{c}" for c in range(shape[0])]
    positions = int(np.prod(shape[1:]))
    width = shape[-1]
    return [f"#{c}@{p // width},{p % width}" for c in range(shape[0]) for p in range(positions)]


def run(args) -> dict:
    if args.top < 1:
        raise UserError(f"--top {args.top} must be at least 1")
    with load_context(args, "na", split=None, needs_poison=True) as ctx:
        if args.visual_dataset == AUTO:
            args.visual_dataset = auto_split(ctx.record, ("bd_train", "bd_test"))
        ctx.split = poisoned_split(ctx, args.visual_dataset, "neuron activation")
        layer = ctx.layer_name(ctx.models["attack"])
        for model in ctx.models.values():
            ctx.layer_name(model)
        poisoned_loader, clean_loader = ctx.loader(ctx.split), ctx.loader(ctx.split.clean_twin())
        results = {label: compute_neuron_activation(model, poisoned_loader, clean_loader, layer, ctx.device,
                                                    args.per_unit)
                   for label, model in ctx.models.items()}
        summary = {"split": ctx.split.name, "pairs": len(ctx.split), "layer": layer}
        rows, unit_rows = [], []
        for label, result in results.items():
            clean, poisoned = result.clean_mean[layer], result.poisoned_mean[layer]
            difference = poisoned - clean
            rank = np.empty(len(difference), int)
            rank[top_by_difference(difference, len(difference))] = np.arange(1, len(difference) + 1)
            rows += [[label, c, clean[c], poisoned[c], difference[c], rank[c]] for c in range(len(clean))]
            top = top_by_difference(difference, args.top)
            summary[f"top_neurons_{label}"] = [{"neuron": int(c), "clean_mean": float(clean[c]),
                                                "poisoned_mean": float(poisoned[c]),
                                                "difference": float(difference[c])} for c in top]
            summary[f"mean_abs_difference_{label}"] = float(np.abs(difference).mean())
            summary[f"share_of_neurons_more_active_when_poisoned_{label}"] = float((difference > 0).mean())
            print(f"{label} model, {layer}, {len(ctx.split)} poisoned/clean pairs: mean |poisoned - clean| = "
                  f"{np.abs(difference).mean():.4f}; largest increase: "
                  + ", ".join(f"#{c} ({difference[c]:+.3f})" for c in top[:5]))
            if args.per_unit:
                pu, cu = result.poisoned_unit_mean[layer].ravel(), result.clean_unit_mean[layer].ravel()
                shape = result.shapes[layer]
                positions = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                width = shape[-1] if len(shape) > 1 else 1
                for unit in range(len(pu)):
                    c, p = divmod(unit, positions)
                    unit_rows.append([label, c, p // width, p % width, cu[unit], pu[unit], pu[unit] - cu[unit]])
                top_units = top_by_difference(pu - cu, args.top)
                names = unit_names(shape)
                summary[f"top_units_{label}"] = [{"unit": names[u], "difference": float(pu[u] - cu[u])}
                                                 for u in top_units]
        ctx.out.save_csv("na_neurons", rows, header=["model", "neuron", "clean_mean", "poisoned_mean", "difference",
                                                     "rank_by_difference"])
        if args.per_unit:
            ctx.out.save_csv("na_units", unit_rows, header=["model", "neuron", "row", "col", "clean_mean",
                                                            "poisoned_mean", "difference"])
        draw_figure(ctx, layer, results, args.top, per_unit=False)
        if args.per_unit:
            draw_figure(ctx, layer, results, args.top, per_unit=True)
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


def draw_figure(ctx, layer: str, results: dict, top: int, per_unit: bool):
    fig, axes = plt.subplots(2, len(results), figsize=(11 * len(results), 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1.6, 1]}, sharex="col")
    for column, (label, result) in enumerate(results.items()):
        if per_unit:
            clean, poisoned = result.clean_unit_mean[layer].ravel(), result.poisoned_unit_mean[layer].ravel()
            names, what = unit_names(result.shapes[layer]), "units (channel, position)"
        else:
            clean, poisoned = result.clean_mean[layer], result.poisoned_mean[layer]
            names, what = [f"#{c}" for c in range(len(clean))], "channels"
        draw_profiles(axes[0, column], axes[1, column], clean, poisoned, names, top,
                      f"{label} model, {layer}: mean activation of {len(clean)} {what.split(' ')[0]}\n"
                      f"over {result.count} poisoned samples ({ctx.split.name}) and their clean twins", what)
    fig.suptitle(f"Neuron activation, {ctx.record.name}", fontsize=12)
    fig.tight_layout()
    ctx.out.save_figure(fig, "na_units" if per_unit else "na")


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="auto")  # resolved in run()
