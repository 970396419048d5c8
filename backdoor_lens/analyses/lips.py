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
import csv
from dataclasses import dataclass
from pathlib import Path

from backdoor_lens.analysis import Analysis
from backdoor_lens.errors import UserError
from backdoor_lens.plot.lipschitz import lipschitz_figure
from backdoor_lens.report.numbers import channels_text
from backdoor_lens.stats.lipschitz import PAIRINGS, compute_channel_lipschitz


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


@dataclass(frozen=True)
class Settings:
    u: float
    normalize_by_layer: bool
    pairing: str


@dataclass
class LipsResult:
    record: str
    settings: Settings
    units: dict  # {model label: [LayerLipschitz]}


def settings(args) -> Settings:
    if args.u < 0:
        raise UserError(f"--u {args.u} must be non-negative")
    return Settings(args.u, bool(args.normalize_by_layer), args.pairing)


def compute(ctx, settings: Settings) -> LipsResult:
    units = {label: compute_channel_lipschitz(model, ctx.example_input(), u=settings.u, pairing=settings.pairing)
             for label, model in ctx.models.items()}
    if not any(units.values()):
        raise UserError("the model has no BatchNorm2d, so BackdoorBench's CLP prunes nothing; use --pairing dataflow"
                        if settings.pairing == "backdoorbench" else
                        "the model has no Conv2d, Linear or BatchNorm layer to bound")
    return LipsResult(ctx.record.name, settings, units)


def table_rows(units):
    rows = []
    for unit in units:
        top = unit.values.max() if len(unit.values) and unit.values.max() > 0 else 1.0
        flagged = set(unit.flagged.tolist())
        for channel, value in enumerate(unit.values):
            rows.append([unit.name, channel, float(value), unit.kind, unit.conv, unit.bn, unit.modules,
                         float(unit.threshold), channel in flagged, float(value / top)])
    return rows


def flagged_rows(units):
    """Every flagged channel, the strongest (value over its layer's threshold) first."""
    return sorted(((u.name, int(c), float(u.values[c]), u.threshold, float(u.values[c] / u.threshold), u.conv, u.bn)
                   for u in units for c in u.flagged), key=lambda r: -r[4])


def write(result: LipsResult, ctx) -> dict:
    s = result.settings
    summary = {"u": s.u, "pairing": s.pairing, "normalize_by_layer": s.normalize_by_layer}
    header = ["layer", "neuron", "lips", "kind", "conv", "bn", "pairing", "threshold", "above_threshold",
              "lips_over_layer_max"]
    for label, units in result.units.items():
        ctx.out.save_csv(f"lips_{label}", table_rows(units), header=header)
        flagged = flagged_rows(units)
        ctx.out.save_csv(f"lips_flagged_{label}", flagged,
                         header=["layer", "neuron", "lips", "threshold", "lips_over_threshold", "conv", "bn"])
        n_channels = sum(len(u.values) for u in units)
        summary[f"layers_{label}"] = len(units)
        summary[f"channels_{label}"] = n_channels
        summary[f"flagged_{label}"] = len(flagged)
        summary[f"flagged_per_layer_{label}"] = {u.name: u.flagged.tolist() for u in units if len(u.flagged)}
        summary[f"max_lips_{label}"] = max(float(u.values.max()) for u in units if len(u.values))
        strongest = ", ".join(f"{name}#{c} ({ratio:.2f}x)" for name, c, _, _, ratio, _, _ in flagged[:5])
        print(f"{label} model: {len(flagged)} of {n_channels} channels in {len(units)} layers above "
              f"mean + {s.u:g} std" + (f"; strongest: {strongest}" if flagged else ""))
    ctx.out.save_figure(lipschitz_figure(result.units, s.u, s.normalize_by_layer, s.pairing, result.record), "lips")
    return summary


def key_numbers(folder) -> list:
    rows = []
    for path in sorted(Path(folder).glob("lips_flagged_*.csv")):
        with open(path) as handle:
            flagged = sorted(csv.DictReader(handle), key=lambda r: -float(r["lips_over_threshold"]))
        model = path.stem[len("lips_flagged_"):]
        rows.append((f"top Lipschitz channels ({model}, x threshold)",
                     f"{len(flagged)} above threshold; " + channels_text(flagged, "lips_over_threshold")))
    return rows


ANALYSIS = Analysis(
    name="lips", title="Channel Lipschitz constants", order=13,
    guide="Upper bounds of each channel's Lipschitz constant; outliers above mean + u*std are the channels CLP "
          "prunes.",
    shows="the upper bound of each channel's Lipschitz constant (as CLP uses)",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=key_numbers,
    splits=(), compares=True, demo_args=("--u", "3"))
