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
summed over channels) is scored (utils/footprint.py has the definitions): share of attribution
inside the footprint, pointing game, IoU of the top-k pixels, correlation with the footprint and
L1 distance to it (Casper et al.'s two scores), next to a blank (uniform) map, a random map and an
edge detector (Sobel magnitude of the image). The ranking (utils/casper.py) gives every method's
mean with a 95% bootstrap interval over images and whether it beats each baseline.
"""
import time

import numpy as np
import torch

from utils.attribution import (choose_images, DEFAULT_METHODS, METHOD_SETS, METHODS, TARGET_CHOICES, Attributor,
                               Options, Skipped, explained_classes, image_title, pages, parse_methods,
                               predict_batch, short, show_heatmap, table_figure)
from utils.casper import DEFAULT_RESAMPLES, ordered, rank_methods
from utils.cli import main
from utils.context import load_context
from utils.device import progress
from utils.errors import UserError
from utils.footprint import (BASELINES, add_localisation_arguments, check_localisation_arguments, describe,
                             draw_footprint, draw_ranking, draw_score_bars, ranking_figure, reduce_map,
                             score_bars_figure, score_maps, save_localisation, split_footprints)
from utils.plotting import show_image

DEMO_ARGS = ["--num_scored", "4"]


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


def draw_maps(ctx, split, positions, maps: dict, predicted, explained, probs, mask_of, label):
    names = ctx.class_names
    methods = list(maps)
    for page_no, rows in enumerate(pages(len(positions))):
        fig, axes = table_figure(len(rows), 1 + len(methods), cell=1.55)
        for r, i in enumerate(rows):
            p = positions[i]
            image = ctx.denormalize(split[int(p)][0])
            title, color = image_title(split, p, names)
            title += f"\npred {short(names[predicted[i]], 10)} {probs[i, predicted[i]]:.2f}"
            show_image(axes[r, 0], image, title, color=color, fontsize=7)
            for c, method in enumerate(methods, start=1):
                show_heatmap(axes[r, c], image, maps[method][i], method.replace("_", " ") if r == 0 else "")
                if int(p) in mask_of:
                    draw_footprint(axes[r, c], mask_of[int(p)])
            axes[r, 1].set_ylabel(f"explains {short(names[explained[i]], 10)}", fontsize=7)
        fig.suptitle(f"Attributions (|.| summed over channels), {label} model, {split.name} of {ctx.record.name}"
                     + (f" (page {page_no + 1})" if page_no else "") + "\ncyan outline: trigger footprint",
                     fontsize=9)
        fig.tight_layout()
        ctx.out.save_figure(fig, "saliency_maps" + (f"_p{page_no + 1}" if page_no else ""))


def write_ranking(ctx, rows: list[dict], methods: list[str], resamples: int, seed: int, images: int) -> list[dict]:
    """Casper et al.'s ranking: CSV of every method, baseline and score, the figure ranked by
    correlation, a printed line per method; returns the correlation rows, best first."""
    import pandas as pd

    ranking = rank_methods(rows, resamples=resamples, seed=seed)
    ctx.out.save_csv("saliency_ranking", pd.DataFrame(ranking))
    by_correlation = ordered(ranking, "correlation")
    order = [r["method"] for r in by_correlation]
    fig, axes = ranking_figure(len(methods))
    draw_ranking(axes[0], {score: [r for r in ranking if r["score"] == score] for score in ("correlation", "l1")},
                 order)
    fig.suptitle(f"Attribution methods ranked by correlation with the trigger footprint (Casper et al.), {images} "
                 f"poisoned images, {ctx.model_label} model, {ctx.record.name}; bars: mean and 95% bootstrap "
                 f"interval", fontsize=9)
    fig.tight_layout()
    ctx.out.save_figure(fig, "saliency_ranking")
    print("ranking by correlation with the trigger footprint (mean [95% bootstrap interval]; beats baseline?):")
    for r in by_correlation:
        verdicts = ", ".join(f"{b} {'yes' if r[f'beats_{b}'] else 'no' if r[f'beats_{b}'] is False else 'n/a'}"
                             for b in BASELINES if f"beats_{b}" in r and b != r["method"])
        print(f"  {r['method']}: {r['mean']:.3f} [{r['low']:.3f}, {r['high']:.3f}]; beats {verdicts}")
    return by_correlation


def run(args) -> dict:
    methods = parse_methods(args.methods)
    if args.num_images < 0 or args.num_scored < 0:
        raise UserError("--num_images and --num_scored must not be negative")
    for flag in ("smooth_samples", "ig_steps", "occlusion_window", "occlusion_stride", "superpixel",
                 "perturbation_samples", "shapley_permutations", "bootstrap"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1")
    tolerance = check_localisation_arguments(args)
    with load_context(args, "saliency", split=None) as ctx:
        split, note, clean_pos, scored, positions = choose_images(ctx, args.num_images,
                                                            max(args.num_images, args.num_scored), args.seed)
        model = ctx.model
        size = split.transform.size
        channels = split.transform.channels
        needs_layer = {"gradcam", "guided_gradcam"} & set(methods)
        options = Options(layer_name=ctx.layer_name(model) if needs_layer else None,
                          smooth_samples=args.smooth_samples, ig_steps=args.ig_steps,
                          occlusion_window=args.occlusion_window, occlusion_stride=args.occlusion_stride,
                          superpixel=args.superpixel, perturbation_samples=args.perturbation_samples,
                          shapley_permutations=args.shapley_permutations,
                          baseline=ctx.transform.normalize(torch.zeros(1, channels, *size)),
                          batch_size=args.batch_size, seed=args.seed)
        attributor = Attributor(model, options)
        x = split.batch(positions)[0]
        predicted, probs = predict_batch(model, x, args.batch_size)
        explained = explained_classes(args.target, predicted, split.original_labels[positions], ctx.target_class)
        raw, skipped, seconds = compute_attributions(attributor, methods, x, explained)
        for note_text in attributor.notes:
            print(f"note: {note_text}")
        for method, why in skipped.items():
            print(f"{method} skipped: {why}")
        if not raw:
            raise UserError(f"every method was skipped on this model ({'; '.join(skipped.values())})")
        reduced = {m: reduce_map(a, size) for m, a in raw.items()}
        masks = split_footprints(split, scored, tolerance)
        mask_of = {int(p): masks[j] for j, p in enumerate(scored)}
        shown = np.concatenate([clean_pos, scored[: args.num_images]])
        pick = [int(np.flatnonzero(positions == p)[0]) for p in shown]
        draw_maps(ctx, split, shown, {m: r[pick] for m, r in reduced.items()}, predicted[pick], explained[pick],
                  probs[pick], mask_of, ctx.model_label)
        summary = {"split": split.name, "model": ctx.model_label, "target": args.target, "methods": list(raw),
                   "skipped": skipped, "seconds_per_method": seconds, "layer": options.layer_name,
                   "clean_images": int(len(clean_pos)),
                   "poisoned_images_scored": int(len(scored)), "note": note}
        if len(scored):
            k = len(clean_pos)
            meta = [{"model": ctx.model_label, "position": int(p), "original_index": int(split.indices[p]),
                     "label": int(split.labels[p]), "original_label": int(split.original_labels[p]),
                     "predicted": int(predicted[k + j]), "explained": int(explained[k + j])}
                    for j, p in enumerate(scored)]
            pixels = split.pixels().batch(scored)[0]
            rows = []
            for i, method in enumerate(reduced):
                rows += score_maps(reduced[method][k:], masks, method, meta, args.topk_percent, seed=args.seed,
                                   baselines=i == 0, images=pixels)
            table = save_localisation(ctx.out, "saliency", rows)
            summary["localisation"] = table
            for method in reduced:
                print(describe(table, method, model=ctx.model_label))
            fig, axes = score_bars_figure(len(reduced))
            draw_score_bars(axes, table, list(reduced))
            n = next((r["images"] for r in table if r["method"] == BASELINES[0]), 0)
            fig.suptitle(f"Trigger localisation of attribution methods, {n} poisoned images, {ctx.model_label} model, "
                         f"{ctx.record.name}", fontsize=10)
            fig.tight_layout()
            ctx.out.save_figure(fig, "saliency_localisation")
            summary["ranking"] = write_ranking(ctx, rows, list(reduced), args.bootstrap, args.seed, n)
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="mixed")
