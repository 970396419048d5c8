"""Attribution suite (Captum) scored against the trigger: which method finds the backdoor?

Each method of --methods attributes the explained class (--target) of every image to its input
pixels. The default suite: saliency |d f / d x|, SmoothGrad (saliency averaged over
Gaussian-noised copies), integrated gradients (from a black image), occlusion (score drop when a
window is replaced by the dataset mean), guided backprop, DeepLift (from a black image), input x
gradient, Grad-CAM (Captum's LayerGradCam on --target_layer_name, upsampled) and LRP (epsilon
rule; skipped with a note where the model's layers do not allow it). Also available: DeepLiftSHAP
and GradientSHAP (baselines: the black image and seeded Gaussian noise around it), deconvolution,
guided Grad-CAM, and the perturbation methods feature ablation, feature permutation, Shapley value
sampling, LIME and KernelSHAP, which switch a grid of --superpixel cells on and off.
`--methods casper` runs Casper et al.'s set: Captum's 16 primary attribution methods.

For every poisoned image the trigger footprint is known from its clean twin, and each map (|.|
summed over channels) is scored (backdoor_lens/attribution/footprint.py has the definitions): share of attribution
inside the footprint, pointing game, IoU of the top-k pixels, correlation with the footprint and
L1 distance to it (Casper et al.'s two scores), next to a blank (uniform) map, a random map and an
edge detector (Sobel magnitude of the image). The ranking (backdoor_lens/attribution/ranking.py) gives every method's
mean with a 95% bootstrap interval over images and whether it beats each baseline.
"""
import time
from dataclasses import dataclass

import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.attribution.explainers import (DEFAULT_METHODS, METHOD_SETS, METHODS, TARGET_CHOICES, Attributor,
                                                  Options, Skipped, parse_methods)
from backdoor_lens.attribution.footprint import BASELINES, reduce_map
from backdoor_lens.attribution.pipeline import (DEFAULT_SPLIT, SPLITS, Classes, Images, Localise,
                                                add_localisation_arguments, choose, classes, print_note, save_pages,
                                                score, write_localisation)
from backdoor_lens.attribution.ranking import DEFAULT_RESAMPLES, ordered, rank_methods
from backdoor_lens.device import progress
from backdoor_lens.errors import UserError
from backdoor_lens.plot.attribution import ranking_figure, saliency_pages, score_bars_figure
from backdoor_lens.report.numbers import localisation_numbers

def add_arguments(parser):
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)}; or {', '.join(METHOD_SETS)} "
                             f"(Casper et al.'s 16 Captum methods)")
    parser.add_argument("--num_images", type=int, default=2, help="clean and poisoned images shown (each)")
    parser.add_argument("--num_scored", type=int, default=8,
                        help="poisoned images attributed and scored against the trigger footprint")
    parser.add_argument("--target", default="predicted", choices=TARGET_CHOICES,
                        help="class explained: the prediction, the true (original) class, or the attack target")
    parser.add_argument("--smooth_samples", type=int, default=16, help="noisy copies per image for SmoothGrad")
    parser.add_argument("--ig_steps", type=int, default=32, help="integration steps of integrated gradients")
    parser.add_argument("--occlusion_window", type=int, help="occlusion window side (default: image side / 8)")
    parser.add_argument("--occlusion_stride", type=int, help="occlusion stride (default: 1, every pixel its own score)")
    parser.add_argument("--superpixel", type=int,
                        help="cell side of the perturbation methods' feature grid (default: image side / 8)")
    parser.add_argument("--perturbation_samples", type=int, default=200,
                        help="random superpixel coalitions per image for LIME and KernelSHAP")
    parser.add_argument("--shapley_permutations", type=int, default=4,
                        help="random superpixel orders per image for Shapley value sampling")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples of the images for the ranking's 95%% intervals")
    add_localisation_arguments(parser)


COUNTS = ("smooth_samples", "ig_steps", "occlusion_window", "occlusion_stride", "superpixel", "perturbation_samples",
          "shapley_permutations")  # the Options fields set from flags of the same name


@dataclass(frozen=True)
class Settings:
    methods: tuple
    num_images: int
    num_scored: int
    target: str
    counts: dict  # {Options field: value} of the COUNTS flags (None: the method's default)
    bootstrap: int
    batch_size: int
    localise: Localise


def settings(args) -> Settings:
    methods = parse_methods(args.methods)
    if args.num_images < 0 or args.num_scored < 0:
        raise UserError("--num_images and --num_scored must not be negative")
    for flag in COUNTS + ("bootstrap",):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1")
    return Settings(tuple(methods), args.num_images, args.num_scored, args.target,
                    {flag: getattr(args, flag) for flag in COUNTS}, args.bootstrap, args.batch_size,
                    Localise(args.topk_percent, args.footprint_tolerance, args.seed))


@dataclass
class SaliencyResult:
    images: Images  # the clean images, then up to --num_scored poisoned ones
    model: str  # "attack" or "defense"
    target: str
    layer: str | None  # Grad-CAM's layer, when a method needs one
    classes: Classes
    maps: dict  # {method: N x H x W reduced maps (|.| summed over channels)}
    skipped: dict  # {method: why}
    seconds: dict  # {method: seconds}
    notes: list  # the attributor's notes (an untraceable model)
    shown: int  # poisoned images drawn (the first of the scored ones)
    rows: list  # localisation rows per poisoned image and map kind, baselines included
    ranking: list  # rank_methods rows of every method, baseline and score
    record: str
    class_names: tuple


def compute_attributions(attributor: Attributor, methods, x: torch.Tensor, targets) -> tuple[dict, dict, dict]:
    """({method: N x C x H x W attribution}, {method: why it was skipped}, {method: seconds})."""
    maps, skipped, seconds = {}, {}, {}
    for method in progress(methods, "methods"):
        started = time.perf_counter()
        try:
            maps[method] = attributor.attribute(method, x, targets).cpu()
        except Skipped as why:
            skipped[method] = str(why)
        seconds[method] = round(time.perf_counter() - started, 2)
    return maps, skipped, seconds


def compute(ctx, settings: Settings) -> SaliencyResult:
    s = settings
    images = choose(ctx, s.num_images, max(s.num_images, s.num_scored), s.localise)
    model = ctx.model
    needs_layer = {"gradcam", "guided_gradcam"} & set(s.methods)
    options = Options(layer_name=ctx.layer_name(model) if needs_layer else None,
                      baseline=ctx.transform.normalize(torch.zeros(1, ctx.transform.channels, *images.size)),
                      batch_size=s.batch_size, seed=s.localise.seed, **s.counts)
    attributor = Attributor(model, options)
    found = classes(ctx, model, images, s.target, s.batch_size)
    raw, skipped, seconds = compute_attributions(attributor, s.methods, images.x, found.explained)
    if not raw:
        raise UserError(f"every method was skipped on this model ({'; '.join(skipped.values())})")
    maps = {m: reduce_map(a, images.size) for m, a in raw.items()}
    rows = score(images, maps, images.meta(ctx.model_label, found.explained, found.predicted), s.localise, edge=True)
    ranking = rank_methods(rows, resamples=s.bootstrap, seed=s.localise.seed) if rows else []
    return SaliencyResult(images=images, model=ctx.model_label, target=s.target, layer=options.layer_name,
                          classes=found, maps=maps, skipped=skipped, seconds=seconds, notes=list(attributor.notes),
                          shown=s.num_images, rows=rows, ranking=ranking, record=ctx.record.name,
                          class_names=ctx.class_names)


def write(result: SaliencyResult, ctx) -> dict:
    images, label = result.images, result.model
    print_note(images)
    for note in result.notes:
        print(f"note: {note}")
    for method, why in result.skipped.items():
        print(f"{method} skipped: {why}")
    save_pages(ctx.out, saliency_pages(images, images.shown(result.shown), result.classes, result.maps,
                                       result.class_names, label, result.record), "saliency_maps")
    summary = {"split": images.split.name, "model": label, "target": result.target, "methods": list(result.maps),
               "skipped": result.skipped, "seconds_per_method": result.seconds, "layer": result.layer,
               "clean_images": images.n_clean, "poisoned_images_scored": int(len(images.poisoned)),
               "note": images.note}
    methods = list(result.maps)
    table = write_localisation(ctx.out, "saliency", result.rows, [(m, "", {"model": label}) for m in methods], summary)
    if table is not None:
        n = next((r["images"] for r in table if r["method"] == BASELINES[0]), 0)
        ctx.out.save_figure(score_bars_figure(table, methods, f"Trigger localisation of attribution methods, {n} "
                                                              f"poisoned images, {label} model, {result.record}"),
                            "saliency_localisation")
        summary["ranking"] = write_ranking(ctx, result, n)
    return summary


def write_ranking(ctx, result: SaliencyResult, images: int) -> list[dict]:
    """Casper et al.'s ranking: CSV of every method, baseline and score, the figure ranked by
    correlation, a printed line per method; returns the correlation rows, best first."""
    import pandas as pd

    ctx.out.save_csv("saliency_ranking", pd.DataFrame(result.ranking))
    by_correlation = ordered(result.ranking, "correlation")
    ctx.out.save_figure(ranking_figure(
        result.ranking, [r["method"] for r in by_correlation], len(result.maps),
        f"Attribution methods ranked by correlation with the trigger footprint (Casper et al.), {images} poisoned "
        f"images, {result.model} model, {result.record}; bars: mean and 95% bootstrap interval"), "saliency_ranking")
    print("ranking by correlation with the trigger footprint (mean [95% bootstrap interval]; beats baseline?):")
    for r in by_correlation:
        verdicts = ", ".join(f"{b} {'yes' if r[f'beats_{b}'] else 'no' if r[f'beats_{b}'] is False else 'n/a'}"
                             for b in BASELINES if f"beats_{b}" in r and b != r["method"])
        print(f"  {r['method']}: {r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}]; beats {verdicts}")
    return by_correlation


ANALYSIS = Analysis(
    name="saliency", title="Attribution suite vs trigger", order=12,
    guide="Each attribution method scored by how much of its mass falls on the known trigger footprint, against "
          "blank and random baselines.",
    shows="a suite of Captum attribution methods scored against the trigger footprint",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=localisation_numbers,
    splits=SPLITS, default_split=DEFAULT_SPLIT,
    # Occlusion with stride 1 is 80% of the demo's saliency time on a CPU (a forward pass per pixel
    # and image); stride 2 (windows of 4 overlapping by half) is a quarter of that.
    demo_args=("--num_scored", "4", "--occlusion_stride", "2"),
    quick_args=("--num_images", "1", "--num_scored", "1", "--methods", "saliency,gradcam"))
