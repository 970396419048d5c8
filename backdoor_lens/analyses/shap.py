"""SHAP values of clean and poisoned images: shap's GradientExplainer (expected gradients).

For an input x, a background set B of clean training images, and class k, the SHAP value of
feature i is E_{b ~ B, t ~ U(0,1)}[ d f_k(b + t (x - b)) / d z_i * (x - b)_i ], estimated with
--nsamples draws; the values of one image sum to about f_k(x) - E_b f_k(b). By default the
features are the input pixels; with --target_layer_name they are that layer's input (shap's
(model, layer) form, summed over channels and upsampled for display; there shap multiplies the
gradient by the layer's input itself, not by its difference from the background's, and runs the
model once per draw, so it is slower and its sums are not f(x) - E f). Each image shows its top
--ranked_outputs classes (red: evidence for the class, blue: against). The top class's map of
each poisoned image is scored against the trigger footprint (backdoor_lens/attribution/footprint.py).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_lens.analysis import Analysis
from backdoor_lens.attribution.explainers import predict_batch
from backdoor_lens.attribution.footprint import reduce_map
from backdoor_lens.attribution.pipeline import (DEFAULT_SPLIT, SPLITS, Images, Localise, add_localisation_arguments,
                                                choose, print_note, save_pages, score, write_localisation)
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer
from backdoor_lens.plot.attribution import shap_pages
from backdoor_lens.report.numbers import localisation_numbers


def add_arguments(parser):
    parser.add_argument("--num_images", type=int, default=2, help="clean and poisoned images explained (each)")
    parser.add_argument("--ranked_outputs", type=int, default=2, help="top classes explained per image")
    parser.add_argument("--nsamples", type=int, default=64, help="expected-gradient draws per image and class")
    parser.add_argument("--background", type=int, default=32, help="clean training images in the background set")
    add_localisation_arguments(parser)


@dataclass(frozen=True)
class Settings:
    num_images: int
    ranked_outputs: int
    nsamples: int
    background: int
    layer_name: str | None  # --target_layer_name: explain that layer's input instead of the pixels
    batch_size: int
    localise: Localise


def settings(args) -> Settings:
    if args.num_images < 0 or args.ranked_outputs < 1 or args.nsamples < 1 or args.background < 1:
        raise UserError("--num_images must not be negative; --ranked_outputs, --nsamples and --background "
                        "must be at least 1")
    return Settings(args.num_images, args.ranked_outputs, args.nsamples, args.background, args.target_layer_name,
                    args.batch_size, Localise(args.topk_percent, args.footprint_tolerance, args.seed))


@dataclass
class ShapResult:
    images: Images  # the clean images, then as many poisoned ones
    model: str  # "attack" or "defense"
    features: str  # "input pixels" or "input of <layer>"
    nsamples: int
    background: int  # clean training images in the background set
    classes: np.ndarray  # N x R: the explained classes, top first
    probs: np.ndarray  # N x K softmax probabilities
    maps: np.ndarray  # N x R x H x W: SHAP values summed over channels (signed), at the image size
    totals: np.ndarray  # N x R: sum of the SHAP values (about f_k(x) - E f_k(b) on the pixels)
    positive: np.ndarray  # N x R: sum of the positive values
    negative: np.ndarray  # N x R: sum of the negative values
    rows: list  # localisation rows of the top class's map of each poisoned image
    record: str
    class_names: tuple


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


def value_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N x ... x R SHAP values -> (sum, sum of the positive ones, sum of the negative ones), each N x R."""
    sums = np.zeros((3, len(values), values.shape[-1]))
    for i in range(len(values)):
        for c in range(values.shape[-1]):
            v = values[i, ..., c]
            sums[:, i, c] = v.sum(), v[v > 0].sum(), v[v < 0].sum()
    return sums[0], sums[1], sums[2]


def compute(ctx, settings: Settings) -> ShapResult:
    s = settings
    images = choose(ctx, s.num_images, s.num_images, s.localise)
    model = ctx.model
    ranked = min(s.ranked_outputs, ctx.num_classes)
    layer = get_layer(model, s.layer_name) if s.layer_name else None
    train = ctx.get_split("clean_train")
    rng = np.random.default_rng(s.localise.seed)
    chosen = np.sort(rng.choice(len(train), size=min(s.background, len(train)), replace=False))
    values, explained = compute_shap(model, images.x, train.batch(chosen)[0], ranked, s.nsamples, layer,
                                     s.localise.seed)
    _, probs = predict_batch(model, images.x, s.batch_size)
    rows = score(images, {"shap": reduce_map(values[..., 0], images.size)},
                 images.meta(ctx.model_label, explained[:, 0]), s.localise)
    totals, positive, negative = value_sums(values)
    return ShapResult(images=images, model=ctx.model_label, nsamples=s.nsamples, background=len(chosen),
                      features=f"input of {s.layer_name}" if s.layer_name else "input pixels", classes=explained,
                      probs=probs, maps=signed_maps(values, images.size), totals=totals, positive=positive,
                      negative=negative, rows=rows, record=ctx.record.name, class_names=ctx.class_names)


def write(result: ShapResult, ctx) -> dict:
    images, names = result.images, result.class_names
    print_note(images)
    save_pages(ctx.out, shap_pages(images, result.maps, result.classes, result.probs, result.totals, names,
                                   result.features, result.model, result.record), "shap")
    value_rows = []
    for i, p in enumerate(images.positions):
        for c, k in enumerate(int(k) for k in result.classes[i]):
            value_rows.append([int(p), int(images.original_index[i]), int(images.poison[i]), int(images.labels[i]),
                               int(images.original_labels[i]), c + 1, k, names[k], float(result.probs[i, k]),
                               float(result.totals[i, c]), float(result.positive[i, c]), float(result.negative[i, c])])
    ctx.out.save_csv("shap_values", value_rows,
                     header=["position", "original_index", "poisoned", "label", "original_label", "rank", "class",
                             "class_name", "probability", "shap_sum", "positive_sum", "negative_sum"])
    summary = {"split": images.split.name, "features": result.features, "model": result.model,
               "ranked_outputs": int(result.classes.shape[1]), "nsamples": result.nsamples,
               "background": int(result.background), "clean_images": images.n_clean,
               "poisoned_images": int(len(images.poisoned)), "note": images.note}
    write_localisation(ctx.out, "shap", result.rows,
                       [("shap", f"{result.model} model, SHAP on the {result.features}", {"model": result.model})],
                       summary)
    return summary


ANALYSIS = Analysis(
    name="shap", title="SHAP values", order=10,
    guide="Red pixels push towards the class; on a poisoned image the trigger region should dominate the target "
          "class.",
    shows="SHAP values (GradientExplainer) of the input pixels for the top classes",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=localisation_numbers,
    splits=SPLITS, default_split=DEFAULT_SPLIT,
    quick_args=("--num_images", "1", "--nsamples", "4", "--background", "4", "--ranked_outputs", "1"))
