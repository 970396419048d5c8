"""SHAP values of clean and poisoned images: shap's GradientExplainer (expected gradients).

For an input x, a background set B of clean training images, and class k, the SHAP value of
feature i is E_{b ~ B, t ~ U(0,1)}[ d f_k(b + t (x - b)) / d z_i * (x - b)_i ], estimated with
--nsamples draws; the values of one image sum to about f_k(x) - E_b f_k(b). By default the
features are the input pixels; with --target_layer_name they are that layer's input (shap's
(model, layer) form, summed over channels and upsampled for display; there shap multiplies the
gradient by the layer's input itself, not by its difference from the background's, and runs the
model once per draw, so it is slower and its sums are not f(x) - E f). Each image shows its top
--ranked_outputs classes (red: evidence for the class, blue: against). The top class's map of
each poisoned image is scored against the trigger footprint (utils/footprint.py).
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils.attribution import (choose_images, image_title, pages, predict_batch, short,
                               show_signed, table_figure)
from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.footprint import (add_localisation_arguments, check_localisation_arguments, describe, draw_footprint,
                             reduce_map, score_maps, save_localisation, split_footprints)
from utils.layers import get_layer
from utils.plotting import show_image

DEMO_ARGS = []


def add_arguments(parser):
    parser.add_argument("--num_images", type=int, default=2, help="clean and poisoned images explained (each)")
    parser.add_argument("--ranked_outputs", type=int, default=2, help="top classes explained per image")
    parser.add_argument("--nsamples", type=int, default=64, help="expected-gradient draws per image and class")
    parser.add_argument("--background", type=int, default=32, help="clean training images in the background set")
    add_localisation_arguments(parser)


def compute_shap(model, x: torch.Tensor, background: torch.Tensor, ranked_outputs: int, nsamples: int,
                 layer=None, seed: int = 0, batch_size: int = 50):
    """SHAP values (N x C' x h' x w' x R, the features' shape: input or the layer's input) and the
    explained classes (N x R, top classes by logit)."""
    import shap

    device = next(model.parameters()).device
    target = model if layer is None else (model, layer)
    explainer = shap.GradientExplainer(target, background.to(device), batch_size=batch_size)
    values, indexes = explainer.shap_values(x.to(device), nsamples=nsamples, ranked_outputs=ranked_outputs,
                                            rseed=seed)
    model.zero_grad(set_to_none=True)
    values = np.asarray(values)
    if values.ndim == x.dim():  # one output: shap leaves out the output axis
        values = values[..., None]
    return values, np.asarray(torch.as_tensor(indexes).cpu())


def signed_maps(values: np.ndarray, size) -> np.ndarray:
    """N x C x h x w x R -> N x R x H x W: summed over channels (signed), resized to the image."""
    summed = torch.as_tensor(values.sum(axis=1)).permute(0, 3, 1, 2).double()
    if tuple(summed.shape[-2:]) != tuple(size):
        summed = F.interpolate(summed, size=tuple(size), mode="bilinear", align_corners=False)
    return summed.numpy()


def run(args) -> dict:
    if args.num_images < 0 or args.ranked_outputs < 1 or args.nsamples < 1 or args.background < 1:
        raise UserError("--num_images must not be negative; --ranked_outputs, --nsamples and --background "
                        "must be at least 1")
    tolerance = check_localisation_arguments(args)
    with load_context(args, "shap", split=None) as ctx:
        split, note, clean_pos, bd_pos, positions = choose_images(ctx, args.num_images, args.num_images, args.seed)
        model = ctx.model
        ranked = min(args.ranked_outputs, ctx.num_classes)
        layer_name = args.target_layer_name
        layer = get_layer(model, layer_name) if layer_name else None
        train = ctx.get_split("clean_train")
        rng = np.random.default_rng(args.seed)
        chosen = np.sort(rng.choice(len(train), size=min(args.background, len(train)), replace=False))
        background = train.batch(chosen)[0]
        x = split.batch(positions)[0]
        values, classes = compute_shap(model, x, background, ranked, args.nsamples, layer, args.seed)
        _, probs = predict_batch(model, x, args.batch_size)
        size = split.transform.size
        maps = signed_maps(values, size)
        masks = split_footprints(split, bd_pos, tolerance)
        mask_of = {int(p): masks[j] for j, p in enumerate(bd_pos)}
        names = ctx.class_names
        where = f"input of {layer_name}" if layer_name else "input pixels"

        for page_no, rows_range in enumerate(pages(len(positions))):
            fig, axes = table_figure(len(rows_range), 1 + ranked)
            for r, i in enumerate(rows_range):
                p = positions[i]
                image = ctx.denormalize(x[i])
                title, color = image_title(split, p, names)
                show_image(axes[r, 0], image, title, color=color)
                for c in range(ranked):
                    k = int(classes[i, c])
                    show_signed(axes[r, c + 1], maps[i, c], image=image, limit=float(np.abs(maps[i]).max()),
                                title=f"#{c + 1} {short(names[k], 12)}\np={probs[i, k]:.2f} "
                                      f"sum={values[i, ..., c].sum():.2f}")
                    if int(p) in mask_of:
                        draw_footprint(axes[r, c + 1], mask_of[int(p)], color="lime")
            fig.suptitle(f"SHAP (expected gradients) on the {where}, {ctx.model_label} model, {ctx.record.name}\n"
                         f"red: for the class, blue: against (one scale per row); green outline: trigger footprint",
                         fontsize=9)
            fig.tight_layout()
            ctx.out.save_figure(fig, "shap" + (f"_p{page_no + 1}" if page_no else ""))

        value_rows = []
        for i, p in enumerate(positions):
            for c in range(ranked):
                v = values[i, ..., c]
                value_rows.append([int(p), int(split.indices[p]), int(split.poison[p]), int(split.labels[p]),
                                   int(split.original_labels[p]), c + 1, int(classes[i, c]), names[int(classes[i, c])],
                                   float(probs[i, int(classes[i, c])]), float(v.sum()), float(v[v > 0].sum()),
                                   float(v[v < 0].sum())])
        ctx.out.save_csv("shap_values", value_rows,
                         header=["position", "original_index", "poisoned", "label", "original_label", "rank", "class",
                                 "class_name", "probability", "shap_sum", "positive_sum", "negative_sum"])
        summary = {"split": split.name, "features": where, "model": ctx.model_label, "ranked_outputs": ranked,
                   "nsamples": args.nsamples, "background": int(len(chosen)), "clean_images": int(len(clean_pos)),
                   "poisoned_images": int(len(bd_pos)), "note": note}
        if len(bd_pos):
            k = len(clean_pos)
            meta = [{"model": ctx.model_label, "position": int(p), "original_index": int(split.indices[p]),
                     "label": int(split.labels[p]), "original_label": int(split.original_labels[p]),
                     "explained": int(classes[k + j, 0])} for j, p in enumerate(bd_pos)]
            reduced = reduce_map(values[k:, ..., 0], size)
            rows = score_maps(reduced, masks, "shap", meta, args.topk_percent, seed=args.seed)
            table = save_localisation(ctx.out, "shap", rows)
            summary["localisation"] = table
            print(describe(table, "shap", f"{ctx.model_label} model, SHAP on the {where}", model=ctx.model_label))
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="mixed")
