"""Grad-CAM family: where in an image a layer's evidence for a class lies, clean vs poisoned images.

For each image, the class explained (--target: the prediction, the true class, or the attack
target) is decomposed over a layer's spatial positions by a CAM method of the grad-cam package
(Grad-CAM: ReLU(sum_c w_c A_c) with w_c the spatial mean of d score / d A_c), upsampled to the
image and drawn over it. Poisoned images get their trigger footprint (the pixels that differ
from the clean twin) outlined, and the maps of up to --num_scored poisoned images are scored
against it: in-footprint share, pointing game, top-k IoU, next to a blank and a random map
(utils/footprint.py). --cam_layers stages repeats this at the last convolution of every spatial
resolution: a 4 x 4 map of the last block can only point to within a cell of the trigger. With a
defense, the attack and defense maps side by side.
"""
import numpy as np

from utils.attribution import (choose_images, CAM_METHODS, TARGET_CHOICES, compute_cam, explained_classes,
                               image_title, pages, predict_batch, short, show_heatmap, stage_layers,
                               table_figure)
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.footprint import (add_localisation_arguments, check_localisation_arguments, describe, draw_footprint,
                             draw_score_bars, reduce_map, score_bars_figure, score_maps, split_footprints, summarize)
from utils.layers import get_layer
from utils.plotting import show_image

DEMO_ARGS = ["--cam_layers", "stages"]


def add_arguments(parser):
    parser.add_argument("--cam_method", default="gradcam", choices=tuple(CAM_METHODS),
                        help="CAM method of the grad-cam package")
    parser.add_argument("--cam_layers", default="",
                        help="'stages' (the last conv of each spatial resolution) or comma-separated layer names "
                             "(default: --target_layer_name, else the model's last conv layer)")
    parser.add_argument("--num_images", type=int, default=2, help="clean and poisoned images shown (each)")
    parser.add_argument("--num_scored", type=int, default=32,
                        help="poisoned images whose maps are scored against the trigger footprint")
    parser.add_argument("--target", default="predicted", choices=TARGET_CHOICES,
                        help="class explained: the prediction, the true (original) class, or the attack target")
    add_localisation_arguments(parser)


def compute_gradcam(model, layers, x, targets, method="gradcam", batch_size=32, quiet=True) -> dict:
    """{layer: N x H x W CAM maps in [0, 1]} explaining class targets[i] of input x[i]."""
    return {layer: compute_cam(model, layer, x, targets, method, batch_size, quiet) for layer in layers}


def resolve_layers(ctx, x) -> list[str]:
    spec = ctx.args.cam_layers.strip()
    model = ctx.models["attack"]
    if spec == "stages":
        layers = stage_layers(model, x)
        if not layers:
            raise UserError("--cam_layers stages found no convolution in the model; name layers instead")
    elif spec:
        layers = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        layers = [ctx.layer_name(model)]
    for m in ctx.models.values():
        for name in layers:
            get_layer(m, name)
    return layers


def draw_maps(ctx, split, positions, n_clean, results, layers, masks_by_position, method):
    """Pages of rows (images) x columns (image, then each model's map at each layer)."""
    names = ctx.class_names
    files = []
    columns = [(label, layer) for label in results for layer in layers]
    for page_no, rows in enumerate(pages(len(positions))):
        fig, axes = table_figure(len(rows), 1 + len(columns))
        for r, i in enumerate(rows):
            p = positions[i]
            image = ctx.denormalize(split[int(p)][0])
            title, color = image_title(split, p, names)
            show_image(axes[r, 0], image, title, color=color)
            mask = masks_by_position.get(int(p))
            for c, (label, layer) in enumerate(columns, start=1):
                res = results[label]
                pred, expl = res["predicted"][i], res["explained"][i]
                conf = res["probs"][i, pred]
                show_heatmap(axes[r, c], image, res["maps"][layer][i],
                             f"{label} · {short(layer, 16)}\npred {short(names[pred], 10)} {conf:.2f}\n"
                             f"explains {short(names[expl], 10)}")
                if mask is not None:
                    draw_footprint(axes[r, c], mask)
        what = "clean and poisoned" if n_clean and len(positions) > n_clean else ("clean" if n_clean else "poisoned")
        suffix = f" (page {page_no + 1})" if page_no else ""
        fig.suptitle(f"{method} on {what} images of {split.name}, {ctx.record.name}{suffix}\n"
                     f"cyan outline: trigger footprint (pixels differing from the clean twin)", fontsize=9)
        fig.tight_layout()
        files.append(ctx.out.save_figure(fig, f"gradcam_{method}" + (f"_p{page_no + 1}" if page_no else "")))
    return files


def run(args) -> dict:
    if args.num_images < 0 or args.num_scored < 0:
        raise UserError("--num_images and --num_scored must not be negative")
    tolerance = check_localisation_arguments(args)
    with load_context(args, "gradcam", split=None) as ctx:
        split, note, clean_pos, scored, positions = choose_images(ctx, args.num_images,
                                                            max(args.num_images, args.num_scored), args.seed)
        shown_bd = scored[: args.num_images]
        x = split.batch(positions)[0]
        layers = resolve_layers(ctx, x)
        masks = split_footprints(split, scored, tolerance)
        orig = split.original_labels[positions]
        results, rows, prediction_rows = {}, [], []
        for label, model in ctx.models.items():
            predicted, probs = predict_batch(model, x, args.batch_size)
            explained = explained_classes(args.target, predicted, orig, ctx.target_class)
            maps = compute_gradcam(model, layers, x, explained, args.cam_method, args.batch_size, args.quiet)
            results[label] = {"predicted": predicted, "probs": probs, "explained": explained, "maps": maps}
            k = len(clean_pos)
            for i, p in enumerate(positions):
                prediction_rows.append([label, int(p), int(split.indices[p]), int(split.poison[p]),
                                        int(split.labels[p]), int(orig[i]), int(predicted[i]),
                                        float(probs[i, predicted[i]]), int(explained[i]),
                                        ctx.class_names[explained[i]], int(i < k + len(shown_bd))])
            meta = [{"model": label, "position": int(p), "original_index": int(split.indices[p]),
                     "label": int(split.labels[p]), "original_label": int(split.original_labels[p]),
                     "predicted": int(predicted[k + j]), "explained": int(explained[k + j])}
                    for j, p in enumerate(scored)]
            for layer in layers:
                reduced = reduce_map(maps[layer][k:, None], split.transform.size) if len(scored) else []
                rows += score_maps(reduced, masks, args.cam_method, [dict(m, layer=layer) for m in meta],
                                   args.topk_percent, seed=args.seed)
        # the shown images are the clean ones and the first --num_images of the scored poisoned ones
        shown = np.arange(len(clean_pos) + len(shown_bd))
        shown_results = {label: {"predicted": r["predicted"][shown], "probs": r["probs"][shown],
                                 "explained": r["explained"][shown],
                                 "maps": {name: m[shown] for name, m in r["maps"].items()}}
                         for label, r in results.items()}
        figures = draw_maps(ctx, split, positions[shown], len(clean_pos), shown_results, layers,
                            {int(p): masks[j] for j, p in enumerate(scored)}, args.cam_method)
        ctx.out.save_csv("gradcam_predictions", prediction_rows,
                         header=["model", "position", "original_index", "poisoned", "label", "original_label",
                                 "predicted", "confidence", "explained_class", "explained_name", "shown"])
        summary = {"split": split.name, "cam_method": args.cam_method, "layers": layers, "target": args.target,
                   "clean_images": int(len(clean_pos)), "poisoned_images_scored": int(len(scored)),
                   "figures": figures, "note": note}
        if len(scored):
            table = summarize(rows, by=("model", "layer", "method"))
            ctx.out.save_csv("gradcam_localisation", _frame(rows))
            ctx.out.save_csv("gradcam_localisation_summary", _frame(table))
            summary["localisation"] = table
            for label in results:
                for layer in layers:
                    print(describe(table, args.cam_method, f"{label} model, {layer}", model=label, layer=layer))
            draw_layer_bars(ctx, table, args.cam_method, list(results), layers)
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


def draw_layer_bars(ctx, table, method, models, layers):
    """Mean scores of each (model, layer) map, with the blank and random baselines."""
    bars = []
    for label in models:
        for layer in layers:
            for row in table:
                if row["model"] == label and row["layer"] == layer and row["method"] == method:
                    bars.append(dict(row, method=f"{label}: {layer}" if len(models) > 1 else layer))
    bases = [dict(r) for r in table if r["method"] in ("blank", "random") and r["model"] == models[0]
             and r["layer"] == layers[0]]
    fig, axes = score_bars_figure(len(bars))
    draw_score_bars(axes, bars + bases, [b["method"] for b in bars])
    fig.suptitle(f"{method}: trigger localisation on {bars[0]['images'] if bars else 0} poisoned images, "
                 f"{ctx.record.name}", fontsize=10)
    fig.tight_layout()
    ctx.out.save_figure(fig, "gradcam_localisation")


def _frame(rows):
    import pandas as pd
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="mixed")
