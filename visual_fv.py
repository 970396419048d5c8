"""Feature visualisation: synthetic images that maximise chosen channels of a layer, or a class logit.

Gradient ascent on an image in a decorrelated Fourier parametrisation with jitter, scale and
rotation robustness and a total-variation penalty (utils/feature_vis.py). Channels: `--channels`,
else the top channels by TAC when visual_tac.py has written its CSV for the record, else the top
channels by channel Lipschitz bound (CLP), else the first ones. `--target class` also optimises the
logit of the attack's target class (or `--classes`): for a backdoored model the trigger often
appears in it. Needs no data.
"""
import csv
from pathlib import Path

import numpy as np
import torch

from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.feature_vis import Objective, compute_feature_visualisation
from utils.layers import get_layer
from utils.lipschitz import compute_channel_lipschitz
from utils.plotting import grid, show_image

DEMO_ARGS = ["--n_channels", "6", "--steps", "32", "--target", "class"]


def add_arguments(parser):
    group = parser.add_argument_group("feature visualisation")
    group.add_argument("--channels", help="comma-separated channel indices of --target_layer_name")
    group.add_argument("--n_channels", type=int, default=16, help="how many channels when --channels is not given")
    group.add_argument("--target", choices=("channel", "class"), default="channel",
                       help="'class' also optimises class logits (the attack target unless --classes)")
    group.add_argument("--classes", help="comma-separated class indices whose logits to optimise (implies --target class; "
                                         "default: the attack target)")
    group.add_argument("--steps", type=int, default=256, help="optimisation steps")
    group.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the Fourier coefficients")
    group.add_argument("--tv_weight", type=float, default=0.5, help="weight of the total-variation penalty")
    group.add_argument("--rotate", type=float, default=10.0, help="largest random rotation per step (degrees)")
    group.add_argument("--jitter", type=float, default=0.06, help="largest random shift per step (fraction of the width)")


def _ints(text: str, flag: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated integers") from None


def layer_width(model, layer: str, example: torch.Tensor) -> int:
    captured = {}
    handle = get_layer(model, layer).register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    try:
        with torch.no_grad():
            model(example)
    finally:
        handle.remove()
    out = captured.get("out")
    if not torch.is_tensor(out) or out.dim() < 2:
        raise UserError(f"layer {layer} does not output a tensor of channels; choose another --target_layer_name")
    return int(out.shape[1])


def tac_ranking(folders, layer: str, model_label: str):
    """Channels of `layer` by descending TAC, from a CSV that visual_tac.py wrote; None when there is none.

    Read loosely: any CSV under the folders with a channel column (neuron/channel) and a column whose
    name contains 'tac' (the first such: the raw value), restricted to `layer` and to the model
    analysed when it has layer and model columns.
    """
    for folder in folders:
        for path in sorted(Path(folder).glob("*.csv")) if Path(folder).is_dir() else []:
            try:
                with open(path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
            except (OSError, csv.Error, UnicodeDecodeError):
                continue
            if not rows:
                continue
            columns = {c.lower(): c for c in rows[0]}
            channel = columns.get("neuron") or columns.get("channel")
            value = next((columns[c] for c in columns if "tac" in c), None)
            if channel is None or value is None:
                continue
            layer_col, model_col = columns.get("layer"), columns.get("model")
            chosen = [r for r in rows if (layer_col is None or r[layer_col] == layer)
                      and (model_col is None or r[model_col] == model_label)]
            try:
                ranked = sorted(chosen, key=lambda r: -float(r[value]))
                return [int(r[channel]) for r in ranked], str(path)
            except (TypeError, ValueError):
                continue
    return None


def lipschitz_ranking(model, layer: str, example: torch.Tensor):
    """Channels of `layer` by descending channel Lipschitz bound (with the BN the layer feeds)."""
    for unit in compute_channel_lipschitz(model, example):
        # rows are named after the conv; a BN given as the layer matches the conv that feeds it
        if layer in (unit.name, unit.conv, unit.bn):
            return np.argsort(-unit.values, kind="stable").tolist(), unit.modules
    return None


def choose_channels(args, ctx, layer: str, example: torch.Tensor) -> tuple[list, str]:
    width = layer_width(ctx.model, layer, example)
    if args.channels is not None:
        channels = _ints(args.channels, "--channels")
        if not channels:
            raise UserError("--channels is empty; give channel indices such as 0,5,17")
        bad = [c for c in channels if not 0 <= c < width]
        if bad:
            raise UserError(f"--channels {bad} out of range; layer {layer} has channels 0..{width - 1}")
        return channels, "--channels"
    if args.n_channels < 1:
        raise UserError("--n_channels must be at least 1")
    n = min(args.n_channels, width)
    folders = [ctx.out.final.parent / "tac", ctx.record.path / "visual" / "tac"]
    found = tac_ranking(folders, layer, ctx.model_label)
    if found and found[0]:
        where = Path(found[1])
        return [c for c in found[0] if 0 <= c < width][:n], f"top {n} by TAC ({where.parent.name}/{where.name})"
    found = lipschitz_ranking(ctx.model, layer, example)
    if found:
        return found[0][:n], f"top {n} by channel Lipschitz bound ({found[1]})"
    return list(range(n)), f"first {n}"


def choose_classes(args, ctx) -> tuple[list, str]:
    if args.classes:
        classes = _ints(args.classes, "--classes")
        bad = [c for c in classes if not 0 <= c < ctx.num_classes]
        if bad:
            raise UserError(f"--classes {bad} out of range; the model has classes 0..{ctx.num_classes - 1}")
        return classes, "--classes"
    if ctx.target_class is not None:
        return [ctx.target_class], "attack target"
    return [0], "class 0 (the record names no attack target; pass --classes)"


def draw(result, objectives, names, target, title: str):
    fig, axes = grid(len(objectives), max_cols=8, cell=1.9, extra_height=0.8)
    for ax, image, objective, value in zip(axes, torch.from_numpy(result.images), objectives, result.final):
        label = objective.label(names)
        if objective.kind == "logit" and objective.index == target:
            label += " (target)"
        show_image(ax, image, f"{label}\n{'logit' if objective.kind == 'logit' else 'act'} {value:.3g}",
                   color="#d62728" if objective.kind == "logit" else "black", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def run(args) -> dict:
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if not args.lr > 0 or args.tv_weight < 0 or not 0 <= args.jitter < 0.5 or args.rotate < 0:
        raise UserError("--lr must be positive, --tv_weight and --rotate non-negative, --jitter in [0, 0.5)")
    with load_context(args, "fv", split=None) as ctx:
        layer = ctx.layer_name()
        height, width = ctx.record.img_size[:2]
        shape = (ctx.transform.channels, height, width)
        example = torch.zeros(1, *shape, device=ctx.device)
        channels, chosen_by = choose_channels(args, ctx, layer, example)
        objectives = [Objective("channel", c) for c in channels]
        classes, classes_by = choose_classes(args, ctx) if args.target == "class" or args.classes else ([], None)
        objectives += [Objective("logit", k) for k in classes]
        names = list(ctx.class_names)
        print(f"layer {layer}: channels {', '.join(map(str, channels))} ({chosen_by})"
              + (f"; class logits {', '.join(names[k] for k in classes)} ({classes_by})" if classes else ""))
        rows = []
        summary = {"layer": layer, "channels": channels, "channels_chosen_by": chosen_by, "classes": classes,
                   "steps": args.steps}
        for label, model in ctx.models.items():
            result = compute_feature_visualisation(
                model, objectives, layer, shape, ctx.transform.normalize, steps=args.steps, lr=args.lr,
                tv_weight=args.tv_weight, rotate_deg=args.rotate, jitter_frac=args.jitter, seed=args.seed,
                device=ctx.device, desc=f"feature visualisation ({label})")
            for objective, start, end in zip(objectives, result.initial, result.final):
                rows.append([label, objective.kind, layer if objective.kind == "channel" else "logits",
                             objective.index, names[objective.index] if objective.kind == "logit" else "",
                             float(start), float(end)])
            fig = draw(result, objectives, names, ctx.target_class,
                       f"Feature visualisation, {label} model, {ctx.record.name}, {args.steps} steps\n"
                       f"{layer}: {chosen_by}")
            ctx.out.save_figure(fig, f"fv_{label}")
            np.save(ctx.out.path(f"fv_images_{label}.npy"), result.images.astype(np.float32))
            is_channel = np.array([o.kind == "channel" for o in objectives])
            gain = result.final[is_channel] - result.initial[is_channel]
            summary[f"mean_initial_activation_{label}"] = float(result.initial[is_channel].mean())
            summary[f"mean_final_activation_{label}"] = float(result.final[is_channel].mean())
            summary[f"mean_activation_gain_{label}"] = float(gain.mean())
            summary[f"final_class_logits_{label}"] = {names[o.index]: float(v) for o, v in
                                                      zip(objectives, result.final) if o.kind == "logit"}
            print(f"{label} model: mean channel activation {result.initial[is_channel].mean():.3g} -> "
                  f"{result.final[is_channel].mean():.3g} over {args.steps} steps"
                  + "".join(f"; logit of {names[o.index]} {s:.3g} -> {v:.3g}" for o, s, v in
                            zip(objectives, result.initial, result.final) if o.kind == "logit"))
        ctx.out.save_csv("fv_activations", rows, header=["model", "objective", "layer", "index", "class_name",
                                                         "initial", "final"])
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="clean_test")
