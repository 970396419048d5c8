"""Grad-CAM family: where in an image a layer's evidence for a class lies, clean vs poisoned images.

For each image, the class explained (--target: the prediction, the true class, or the attack
target) is decomposed over a layer's spatial positions by a CAM method of the grad-cam package
(Grad-CAM: ReLU(sum_c w_c A_c) with w_c the spatial mean of d score / d A_c), upsampled to the
image and drawn over it. Poisoned images get their trigger footprint (the pixels that differ
from the clean twin) outlined, and the maps of up to --num_scored poisoned images are scored
against it: in-footprint share, pointing game, top-k IoU, next to a blank and a random map
(backdoor_lens/attribution/footprint.py). --cam_layers stages repeats this at the last convolution of every spatial
resolution: a 4 x 4 map of the last block can only point to within a cell of the trigger. With a
defense, the attack and defense maps side by side.
"""
from dataclasses import dataclass

from backdoor_lens.analysis import Analysis
from backdoor_lens.attribution.explainers import CAM_METHODS, TARGET_CHOICES, compute_cam, stage_layers
from backdoor_lens.attribution.footprint import reduce_map
from backdoor_lens.attribution.pipeline import (DEFAULT_SPLIT, SPLITS, Images, Localise,
                                                add_localisation_arguments, choose, classes, print_note, save_pages,
                                                score, write_localisation)
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer
from backdoor_lens.plot.attribution import gradcam_pages, layer_bars_figure
from backdoor_lens.report.numbers import localisation_numbers


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


@dataclass(frozen=True)
class Settings:
    cam_method: str
    cam_layers: str  # "", "stages" or comma-separated layer names
    num_images: int
    num_scored: int
    target: str
    batch_size: int
    quiet: bool
    localise: Localise


def settings(args) -> Settings:
    if args.num_images < 0 or args.num_scored < 0:
        raise UserError("--num_images and --num_scored must not be negative")
    return Settings(args.cam_method, args.cam_layers.strip(), args.num_images, args.num_scored, args.target,
                    args.batch_size, args.quiet, Localise(args.topk_percent, args.footprint_tolerance, args.seed))


@dataclass
class GradcamResult:
    images: Images  # the clean images, then up to --num_scored poisoned ones
    method: str
    layers: list
    target: str
    shown: int  # poisoned images drawn (the first of the scored ones)
    classes: dict  # {model label: Classes}
    maps: dict  # {model label: {layer: N x H x W CAM maps in [0, 1]}}
    rows: list  # localisation rows per poisoned image, model and layer
    record: str
    class_names: tuple


def compute_gradcam(model, layers, x, targets, method="gradcam", batch_size=32, quiet=True) -> dict:
    """{layer: N x H x W CAM maps in [0, 1]} explaining class targets[i] of input x[i]."""
    return {layer: compute_cam(model, layer, x, targets, method, batch_size, quiet) for layer in layers}


def resolve_layers(ctx, spec: str, x) -> list[str]:
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


def compute(ctx, settings: Settings) -> GradcamResult:
    s = settings
    images = choose(ctx, s.num_images, max(s.num_images, s.num_scored), s.localise)
    layers = resolve_layers(ctx, s.cam_layers, images.x)
    by_model, maps, rows = {}, {}, []
    for label, model in ctx.models.items():
        by_model[label] = found = classes(ctx, model, images, s.target, s.batch_size)
        maps[label] = compute_gradcam(model, layers, images.x, found.explained, s.cam_method, s.batch_size, s.quiet)
        meta = images.meta(label, found.explained, found.predicted)
        for layer in layers:
            rows += score(images, {s.cam_method: reduce_map(maps[label][layer][:, None], images.size)},
                          [dict(m, layer=layer) for m in meta], s.localise)
    return GradcamResult(images=images, method=s.cam_method, layers=layers, target=s.target, shown=s.num_images,
                         classes=by_model, maps=maps, rows=rows, record=ctx.record.name, class_names=ctx.class_names)


def write(result: GradcamResult, ctx) -> dict:
    images, names = result.images, result.class_names
    print_note(images)
    # the shown images are the clean ones and the first --num_images of the scored poisoned ones
    shown = images.shown(result.shown)
    figures = save_pages(ctx.out, gradcam_pages(images, shown, result.classes, result.maps, result.layers, names,
                                                result.method, result.record), f"gradcam_{result.method}")
    prediction_rows = []
    for label, found in result.classes.items():
        for i, p in enumerate(images.positions):
            pred, expl = int(found.predicted[i]), int(found.explained[i])
            prediction_rows.append([label, int(p), int(images.original_index[i]), int(images.poison[i]),
                                    int(images.labels[i]), int(images.original_labels[i]), pred,
                                    float(found.probs[i, pred]), expl, names[expl], int(i < len(shown))])
    ctx.out.save_csv("gradcam_predictions", prediction_rows,
                     header=["model", "position", "original_index", "poisoned", "label", "original_label",
                             "predicted", "confidence", "explained_class", "explained_name", "shown"])
    summary = {"split": images.split.name, "cam_method": result.method, "layers": result.layers,
               "target": result.target, "clean_images": images.n_clean,
               "poisoned_images_scored": int(len(images.poisoned)), "figures": figures, "note": images.note}
    models = list(result.classes)
    lines = [(result.method, f"{label} model, {layer}", {"model": label, "layer": layer})
             for label in models for layer in result.layers]
    table = write_localisation(ctx.out, "gradcam", result.rows, lines, summary, by=("model", "layer", "method"))
    if table is not None:
        ctx.out.save_figure(layer_bars_figure(table, result.method, models, result.layers, result.record),
                            "gradcam_localisation")
    return summary


ANALYSIS = Analysis(
    name="gradcam", title="Grad-CAM", order=9,
    guide="On poisoned images a backdoored model looks at the trigger; the localisation CSV scores this against "
          "the trigger footprint.",
    shows="Grad-CAM maps of clean and poisoned images",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=localisation_numbers,
    splits=SPLITS, default_split=DEFAULT_SPLIT, compares=True,
    demo_args=("--cam_layers", "stages"), quick_args=("--num_images", "1", "--num_scored", "2"))
