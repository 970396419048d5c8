"""Channel Lipschitz constants (CLP's upper bound) of every convolution and linear layer, scaled by their BatchNorm.

Per output channel k: UCLC_k = sigma_max(W_k) * |gamma_k| / sqrt(var_k + eps), the largest singular
value of the channel's kernel (reshaped to in x k*k) times the scale of the BatchNorm the conv is
paired with. Channels above mean + u * std of their layer are the ones CLP would prune: the likely
backdoor channels. Needs no data. With a defense, both models side by side.
--pairing dataflow (default, CLP's definition): each conv is scaled by the BN its output reaches,
following the data flow through residual sums and ReLUs (in a pre-activation ResNet, conv2 and the
shortcut conv reach the next block's bn1; in torchvision's ResNet and VGG-BN, the BN right after);
a conv that reaches no BN before the next conv keeps its raw kernel norm; eps included.
--pairing backdoorbench: what BackdoorBench's CLP defense computes and prunes: each BatchNorm2d
paired with the last Conv2d registered before it in named_modules() order, std = sqrt(var) without
eps; the channels flagged are exactly those that defense zeroes. The CSVs name the conv and the BN
of every row.
"""
import numpy as np
import torch

from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.lipschitz import PAIRINGS, compute_channel_lipschitz
from utils.plotting import plt, side_by_side

DEMO_ARGS = ["--u", "3"]


def add_arguments(parser):
    parser.add_argument("--u", type=float, default=3.0, help="CLP threshold: mean + u * std of each layer's channels")
    parser.add_argument("--normalize_by_layer", action="store_true",
                        help="colour each layer's channels relative to the layer's largest (the CSV keeps raw values)")
    parser.add_argument("--pairing", choices=PAIRINGS, default="dataflow",
                        help="which BatchNorm scales each conv. dataflow: CLP's definition, UCLC_k = sigma_max(W_k) * "
                             "|gamma_k| / sqrt(var + eps) with the BN the conv's output reaches, through a residual "
                             "sum or a ReLU; a conv that reaches no BN keeps its raw kernel norm; one row per conv. "
                             "backdoorbench: as BackdoorBench's CLP defense, each BatchNorm2d with the last Conv2d "
                             "registered before it (named_modules() order, whatever the data flow), sqrt(var) "
                             "without eps, one row per BN; the flagged channels are those that defense zeroes")


def example_input(ctx) -> torch.Tensor:
    height, width = ctx.record.img_size[:2]
    return torch.zeros(1, ctx.transform.channels, height, width, device=ctx.device)


def table_rows(units):
    rows = []
    for unit in units:
        top = unit.values.max() if len(unit.values) and unit.values.max() > 0 else 1.0
        flagged = set(unit.flagged.tolist())
        for channel, value in enumerate(unit.values):
            rows.append([unit.name, channel, float(value), unit.kind, unit.conv, unit.bn, unit.modules,
                         float(unit.threshold), channel in flagged, float(value / top)])
    return rows


def heat_matrix(units, normalize: bool) -> np.ndarray:
    width = max(len(u.values) for u in units)
    matrix = np.full((len(units), width), np.nan)
    for row, unit in enumerate(units):
        values = unit.values
        if normalize:
            top = values.max()
            values = values / top if top > 0 else values
        matrix[row, :len(values)] = values
    return matrix


def draw_heat(ax, units, title: str, normalize: bool, u: float, vmax: float):
    matrix = heat_matrix(units, normalize)
    cmap = plt.get_cmap("Oranges").with_extremes(bad="white")
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ys, xs = [], []
    for row, unit in enumerate(units):
        ys += [row] * len(unit.flagged)
        xs += unit.flagged.tolist()
    if xs:
        ax.scatter(xs, ys, s=10, marker="o", facecolors="none", edgecolors="#1f77b4", linewidths=0.8,
                   label=f"above mean + {u:g} std of its layer")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.06), fontsize=7, frameon=False)
    ax.set_yticks(range(len(units)))
    ax.set_yticklabels([f"{u.name} [{u.kind}]" for u in units], fontsize=6 if len(units) > 30 else 7)
    ax.set_xlabel("channel")
    ax.set_title(title, fontsize=10)
    return image


def run(args) -> dict:
    if args.u < 0:
        raise UserError(f"--u {args.u} must be non-negative")
    with load_context(args, "lips", split=None) as ctx:
        results = {label: compute_channel_lipschitz(model, example_input(ctx), u=args.u, pairing=args.pairing)
                   for label, model in ctx.models.items()}
        if not any(results.values()):
            raise UserError("the model has no BatchNorm2d, so BackdoorBench's CLP prunes nothing; use --pairing dataflow"
                            if args.pairing == "backdoorbench" else
                            "the model has no Conv2d, Linear or BatchNorm layer to bound")
        rows_per_model = max(len(units) for units in results.values())
        fig, axes = side_by_side(len(results), width=9, height=max(4.0, 0.2 * rows_per_model + 1.5))
        fig.subplots_adjust(wspace=0.4)  # room for the next panel's layer names
        # One colour scale for all panels, so that attack and defense compare directly.
        vmax = 1.0 if args.normalize_by_layer else max(float(u.values.max()) for units in results.values()
                                                       for u in units if len(u.values))
        summary = {"u": args.u, "pairing": args.pairing, "normalize_by_layer": bool(args.normalize_by_layer)}
        header = ["layer", "neuron", "lips", "kind", "conv", "bn", "pairing", "threshold", "above_threshold",
                  "lips_over_layer_max"]
        for ax, (label, units) in zip(axes, results.items()):
            ctx.out.save_csv(f"lips_{label}", table_rows(units), header=header)
            flagged = sorted(((u.name, int(c), float(u.values[c]), u.threshold, float(u.values[c] / u.threshold),
                               u.conv, u.bn) for u in units for c in u.flagged), key=lambda r: -r[4])
            ctx.out.save_csv(f"lips_flagged_{label}", flagged,
                             header=["layer", "neuron", "lips", "threshold", "lips_over_threshold", "conv", "bn"])
            n_channels = sum(len(u.values) for u in units)
            image = draw_heat(ax, units, f"{label} model: {len(flagged)} of {n_channels} channels above mean + "
                              f"{args.u:g} std", args.normalize_by_layer, args.u, vmax or 1.0)
            summary[f"layers_{label}"] = len(units)
            summary[f"channels_{label}"] = n_channels
            summary[f"flagged_{label}"] = len(flagged)
            summary[f"flagged_per_layer_{label}"] = {u.name: u.flagged.tolist() for u in units if len(u.flagged)}
            summary[f"max_lips_{label}"] = max(float(u.values.max()) for u in units if len(u.values))
            strongest = ", ".join(f"{name}#{c} ({ratio:.2f}x)" for name, c, _, _, ratio, _, _ in flagged[:5])
            print(f"{label} model: {len(flagged)} of {n_channels} channels in {len(units)} layers above "
                  f"mean + {args.u:g} std" + (f"; strongest: {strongest}" if flagged else ""))
        fig.colorbar(image, ax=list(axes), fraction=0.02 if len(axes) > 1 else 0.03, pad=0.02,
                     label="Lipschitz bound / layer max" if args.normalize_by_layer else "channel Lipschitz bound")
        fig.suptitle(f"Channel Lipschitz upper bounds ({args.pairing} pairing), {ctx.record.name}", fontsize=11)
        ctx.out.save_figure(fig, "lips")
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="clean_test")
