"""Feature visualisation: synthetic images that maximise chosen channels of a layer, or a class logit.

Gradient ascent on an image in a decorrelated Fourier parametrisation with jitter, scale and
rotation robustness and a total-variation penalty (backdoor_lens/stats/feature_vis.py). Channels:
`--channels`, else the top channels of the layer by TAC (trigger activation change, as `tac`
measures it) over the poisoned samples of the split and their clean twins (bd_train when the record
has it, else bd_test; --n_sub caps the pairs), else, for a record without poisoned samples, the top
channels by channel Lipschitz bound (CLP), else the first ones. `--target class` also optimises the
logit of the attack's target class (or `--classes`): for a backdoored model the trigger often
appears in it. The images themselves need no data.

Defaults sized for the device (DEVICE_DEFAULTS): a GPU optimises 256 steps and ranks the channels
over every poisoned sample of the split. On 2 CPU cores a PreAct-ResNet-18 step on 16 images of
32x32 takes about 0.25-0.45 s and a forward pass 70-130 images a second, so those defaults on a
CIFAR-10-sized record (5000 poisoned training samples) need 3 to 6 minutes and more under load;
a CPU takes 128 steps and at most 1000 poisoned/clean pairs (about 1 to 2 minutes), says so up
front, and uses --steps / --n_sub as given when they are.
"""
from dataclasses import dataclass

import numpy as np
import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.device import fill_device_defaults
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer
from backdoor_lens.plot.feature_vis import feature_vis_figure
from backdoor_lens.stats.activations import rank_channels
from backdoor_lens.stats.feature_vis import Objective, compute_feature_visualisation
from backdoor_lens.stats.lipschitz import compute_channel_lipschitz


def add_arguments(parser):
    group = parser.add_argument_group("feature visualisation")
    group.add_argument("--channels", help="comma-separated channel indices of --target_layer_name")
    group.add_argument("--n_channels", type=int, default=16, help="how many channels when --channels is not given")
    group.add_argument("--target", choices=("channel", "class"), default="channel",
                       help="'class' also optimises class logits (the attack target unless --classes)")
    group.add_argument("--classes", help="comma-separated class indices whose logits to optimise (implies --target class; "
                                         "default: the attack target)")
    group.add_argument("--steps", type=int, default=None, help="optimisation steps (default 256 on a GPU, 128 on a CPU)")
    group.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the Fourier coefficients")
    group.add_argument("--tv_weight", type=float, default=0.5, help="weight of the total-variation penalty")
    group.add_argument("--rotate", type=float, default=10.0, help="largest random rotation per step (degrees)")
    group.add_argument("--jitter", type=float, default=0.06, help="largest random shift per step (fraction of the width)")


@dataclass(frozen=True)
class Settings:
    channels: tuple | None  # None: the top n_channels (by TAC, else by Lipschitz bound)
    n_channels: int
    logits: bool  # also optimise class logits
    classes: tuple | None  # their classes; None: the attack target
    steps: int
    lr: float
    tv_weight: float
    rotate: float  # degrees
    jitter: float  # fraction of the width
    seed: int
    device_defaults: dict  # the cost flags left unset, with the values the device rule gave them


def _ints(text: str, flag: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated integers") from None


# The cost flags a run leaves unset, by device (module docstring). n_sub caps the poisoned/clean
# pairs of the TAC ranking (None: all of them).
DEVICE_DEFAULTS = {"gpu": {"steps": 256, "n_sub": None}, "cpu": {"steps": 128, "n_sub": 1000}}
WHAT = {"steps": "optimisation steps", "n_sub": "poisoned/clean pairs at most for the TAC ranking"}


def apply_device_defaults(args) -> dict:
    """Give the cost flags left unset (None) this device's values, in `args` itself (the context
    reads --n_sub, run.json records the arguments). Returns {flag: value} of the flags filled;
    on a CPU prints one line saying what was chosen and which flags change it."""
    filled, kind = fill_device_defaults(args, DEVICE_DEFAULTS)
    if kind == "cpu" and filled:
        gpu = DEVICE_DEFAULTS["gpu"]
        print(f"on a CPU: {', '.join(f'{v} {WHAT[k]}' for k, v in filled.items())} (on a GPU "
              f"{', '.join(str(gpu[k] if gpu[k] is not None else 'all') for k in filled)}); "
              f"set {' / '.join('--' + k for k in filled)} for more", flush=True)
    return filled


def settings(args) -> Settings:
    filled = apply_device_defaults(args)
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if not args.lr > 0 or args.tv_weight < 0 or not 0 <= args.jitter < 0.5 or args.rotate < 0:
        raise UserError("--lr must be positive, --tv_weight and --rotate non-negative, --jitter in [0, 0.5)")
    channels = None if args.channels is None else _ints(args.channels, "--channels")
    if channels is not None and not channels:
        raise UserError("--channels is empty; give channel indices such as 0,5,17")
    if channels is None and args.n_channels < 1:
        raise UserError("--n_channels must be at least 1")
    return Settings(channels, args.n_channels, args.target == "class" or bool(args.classes),
                    _ints(args.classes, "--classes") if args.classes else None, args.steps, args.lr, args.tv_weight,
                    args.rotate, args.jitter, args.seed, filled)


@dataclass
class FeatureVisualisation:
    record: str
    layer: str
    channels: list
    channels_chosen_by: str
    classes: list
    classes_chosen_by: str | None
    objectives: list  # [Objective]: the channels, then the class logits
    class_names: list
    target: int | None  # the attack target (marked in the figure)
    steps: int
    images: dict  # {model label: FeatureVisResult}
    device_defaults: dict  # Settings.device_defaults
    pairs: int | None  # poisoned/clean pairs of the TAC ranking (None: not ranked by TAC)


def layer_width(model, layer: str, example: torch.Tensor) -> int:
    """The number of channels `layer` outputs (one forward pass of `example`)."""
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


def lipschitz_ranking(model, layer: str, example: torch.Tensor):
    """Channels of `layer` by descending channel Lipschitz bound (with the BN the layer feeds)."""
    for unit in compute_channel_lipschitz(model, example):
        # rows are named after the conv; a BN given as the layer matches the conv that feeds it
        if layer in (unit.name, unit.conv, unit.bn):
            return np.argsort(-unit.values, kind="stable").tolist(), unit.modules
    return None


def choose_channels(ctx, settings: Settings, layer: str, example: torch.Tensor) -> tuple[list, str, int | None]:
    """(channels, how they were chosen, the poisoned/clean pairs of the TAC ranking or None)."""
    width = layer_width(ctx.model, layer, example)
    if settings.channels is not None:
        bad = [c for c in settings.channels if not 0 <= c < width]
        if bad:
            raise UserError(f"--channels {bad} out of range; layer {layer} has channels 0..{width - 1}")
        return list(settings.channels), "--channels", None
    n = min(settings.n_channels, width)
    if ctx.record.bd_train is not None or ctx.record.bd_test is not None:
        ctx.split = ctx.poisoned_split(ctx.split_name(), "the TAC ranking of fv")
        ranking = rank_channels(ctx.model, ctx.loader(ctx.split), ctx.loader(ctx.split.clean_twin()), layer,
                                ctx.device)
        return [int(c) for c in ranking.channels[:n]], \
            f"top {n} by TAC ({len(ctx.split)} poisoned/clean pairs of {ctx.split.name})", len(ctx.split)
    found = lipschitz_ranking(ctx.model, layer, example)
    if found:
        return found[0][:n], f"top {n} by channel Lipschitz bound ({found[1]})", None
    return list(range(n)), f"first {n}", None


def choose_classes(ctx, settings: Settings) -> tuple[list, str]:
    if settings.classes is not None:
        bad = [c for c in settings.classes if not 0 <= c < ctx.num_classes]
        if bad:
            raise UserError(f"--classes {bad} out of range; the model has classes 0..{ctx.num_classes - 1}")
        return list(settings.classes), "--classes"
    if ctx.target_class is not None:
        return [ctx.target_class], "attack target"
    return [0], "class 0 (the record names no attack target; pass --classes)"


def compute(ctx, settings: Settings) -> FeatureVisualisation:
    layer = ctx.layer_name()
    height, width = ctx.record.img_size[:2]
    shape = (ctx.transform.channels, height, width)
    channels, chosen_by, pairs = choose_channels(ctx, settings, layer, torch.zeros(1, *shape, device=ctx.device))
    classes, classes_by = choose_classes(ctx, settings) if settings.logits else ([], None)
    objectives = [Objective("channel", c) for c in channels] + [Objective("logit", k) for k in classes]
    images = {label: compute_feature_visualisation(
        model, objectives, layer, shape, ctx.transform.normalize, steps=settings.steps, lr=settings.lr,
        tv_weight=settings.tv_weight, rotate_deg=settings.rotate, jitter_frac=settings.jitter, seed=settings.seed,
        device=ctx.device, desc=f"feature visualisation ({label})") for label, model in ctx.models.items()}
    return FeatureVisualisation(ctx.record.name, layer, channels, chosen_by, classes, classes_by, objectives,
                                list(ctx.class_names), ctx.target_class, settings.steps, images,
                                settings.device_defaults, pairs)


def write(result: FeatureVisualisation, ctx) -> dict:
    names, objectives, layer, steps = result.class_names, result.objectives, result.layer, result.steps
    print(f"layer {layer}: channels {', '.join(map(str, result.channels))} ({result.channels_chosen_by})"
          + (f"; class logits {', '.join(names[k] for k in result.classes)} ({result.classes_chosen_by})"
             if result.classes else ""))
    rows = []
    summary = {"layer": layer, "channels": result.channels, "channels_chosen_by": result.channels_chosen_by,
               "classes": result.classes, "steps": steps, "tac_pairs": result.pairs,
               "device_defaults": result.device_defaults}
    is_channel = np.array([o.kind == "channel" for o in objectives])
    for label, vis in result.images.items():
        for objective, start, end in zip(objectives, vis.initial, vis.final):
            rows.append([label, objective.kind, layer if objective.kind == "channel" else "logits",
                         objective.index, names[objective.index] if objective.kind == "logit" else "",
                         float(start), float(end)])
        ctx.out.save_figure(feature_vis_figure(vis.images, objectives, vis.final, names, result.target,
                                               f"Feature visualisation, {label} model, {result.record}, {steps} steps\n"
                                               f"{layer}: {result.channels_chosen_by}"), f"fv_{label}")
        np.save(ctx.out.path(f"fv_images_{label}.npy"), vis.images.astype(np.float32))
        initial, final = vis.initial[is_channel], vis.final[is_channel]
        summary[f"mean_initial_activation_{label}"] = float(initial.mean())
        summary[f"mean_final_activation_{label}"] = float(final.mean())
        summary[f"mean_activation_gain_{label}"] = float((final - initial).mean())
        summary[f"final_class_logits_{label}"] = {names[o.index]: float(v) for o, v in
                                                  zip(objectives, vis.final) if o.kind == "logit"}
        print(f"{label} model: mean channel activation {initial.mean():.3g} -> {final.mean():.3g} over {steps} steps"
              + "".join(f"; logit of {names[o.index]} {s:.3g} -> {v:.3g}" for o, s, v in
                        zip(objectives, vis.initial, vis.final) if o.kind == "logit"))
    ctx.out.save_csv("fv_activations", rows, header=["model", "objective", "layer", "index", "class_name",
                                                     "initial", "final"])
    return summary


ANALYSIS = Analysis(
    name="fv", title="Feature visualisation", order=16,
    guide="Synthetic inputs that maximise chosen channels or the target logit; the trigger pattern often appears.",
    shows="synthetic images that maximise chosen channels or the target class (feature visualisation)",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments,
    splits=("bd_train", "bd_test"), default_split="auto",
    demo_args=("--n_channels", "6", "--steps", "32", "--target", "class"), quick_args=("--steps", "3", "--n_channels", "2"))
