"""Poison detectors scored side by side against the record's ground truth.

A BackdoorBench record knows which training samples are poisoned and which test inputs carry the
trigger, so the standard detectors can be scored, not only run:

- training-set detectors on bd_train (or subset; --visual_dataset), from one forward pass that
  collects a layer's features (default the penultimate layer: the input of the last Linear;
  --target_layer_name for another, averaged per channel unless --pool flatten) and the
  predictions: Activation Clustering, Spectral Signatures, SPECTRE and a Mahalanobis baseline;
- STRIP on mixed (--strip_inputs of its clean and poisoned test inputs), superimposed with
  --strip_overlays held-out clean training images, its threshold from --strip_clean others;
- Neural Cleanse on the model: per class the smallest mask and pattern that turn --nc_images clean
  test images into that class; anomaly index, flagged class, and the IoU of the target's mask with
  the true trigger footprint (pixels where poisoned test images differ from their clean twins).

Each sample-level detector gets AUROC, average precision, TPR at 1% and 5% FPR and the TPR and FPR
of its own decision rule. Higher score = more suspect everywhere; STRIP's score is minus its
entropy in bits. WaNet/InputAware cross samples (flagged, label kept) are a group of their own,
left out of the numbers. Definitions: backdoor_lens/stats/detectors.py. With a defense, the defense model is
examined. Records without bd_train (blind, lira) get STRIP and Neural Cleanse only.
"""
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch

from backdoor_lens.analysis import Analysis
from backdoor_lens.attribution.footprint import WHOLE_IMAGE, localisation, split_footprints
from backdoor_lens.device import progress
from backdoor_lens.errors import UserError
from backdoor_lens.models.layers import get_layer, penultimate_layer
from backdoor_lens.plot.detect import draw_cleanse, draw_scores, fmt_rate
from backdoor_lens.record.splits import AUTO, kept_classes, stratified_positions
from backdoor_lens.report.numbers import fmt, read_summary
from backdoor_lens.stats.detectors import (DETECTORS, RULES, SCORE_MEANING, TITLES, TRAIN_DETECTORS, Cleanse, Detection,
                                           activation_clustering, evaluate, mahalanobis, reverse_engineer,
                                           spectral_signature, spectre, strip_entropy, strip_threshold)
from backdoor_lens.stats.activations import shared_outputs
from backdoor_lens.stats.embedding import CROSS, GROUP_NAMES, POISONED, sample_groups
from backdoor_lens.stats.features import iterate, pooled

TRAIN_SPLITS = ("bd_train", "subset")
FOOTPRINT_PAIRS = 16  # poisoned/clean test pairs whose majority of differing pixels is the footprint


# The detectors' numeric flags by group: (name, type, default, check, help); the checks (CHECKS) run
# in settings(), before anything is loaded.
FLAGS = {
    "training-set detectors": (
        ("ac_dim", int, 10, "count", "Activation Clustering: principal components kept"),
        ("ac_size_threshold", float, 0.35, "fraction",
         "Activation Clustering: the smaller cluster is flagged below this share of its class"),
        ("spectre_dim", int, 32, "count", "SPECTRE: singular directions kept")),
    "STRIP": (
        ("strip_inputs", int, 200, "count", "inputs of mixed scored (stratified)"),
        ("strip_overlays", int, 8, "count", "clean training images superimposed on each"),
        ("strip_clean", int, 100, "count", "held-out clean training images whose entropies set the threshold"),
        ("strip_frr", float, 0.01, "fraction", "false rejection rate the threshold allows")),
    "Neural Cleanse": (
        ("nc_images", int, 16, "count", "clean test images the triggers are fitted on"),
        ("nc_batch", int, 4, "count", "images per optimisation step"),
        ("nc_steps", int, 80, "count", "optimisation steps per class"),
        ("nc_lr", float, 0.3, "positive", "Adam's learning rate (NC's 0.1 needs far more steps than the default)"),
        ("nc_cost", float, 1e-2, "positive", "initial weight of the mask's L1 norm (NC's 1e-3 needs far more steps)"),
        ("nc_classes", int, None, "count",
         "reverse-engineer only this many classes, the target among them (none given: all)")),
}
# check -> (test, the refusal's end), in the order they are checked.
CHECKS = {"count": (lambda v: v >= 1, "must be at least 1"),
          "fraction": (lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
          "positive": (lambda v: v > 0, "must be positive")}


def add_arguments(parser):
    parser.add_argument("--detectors", default=",".join(DETECTORS),
                        help=f"comma-separated, from: {', '.join(DETECTORS)}")
    parser.add_argument("--pool", choices=("avg", "flatten"), default="avg",
                        help="a named conv layer's output per sample: averaged per channel, or flattened")
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for name, kind, default, _, text in flags:
            group.add_argument(f"--{name}", type=kind, default=default, help=text)


@dataclass(frozen=True)
class Settings:
    detectors: tuple
    split: str
    pool: str
    ac_dim: int
    ac_size_threshold: float
    spectre_dim: int
    strip_inputs: int
    strip_overlays: int
    strip_clean: int
    strip_frr: float
    nc_images: int
    nc_batch: int
    nc_steps: int
    nc_lr: float
    nc_cost: float
    nc_classes: int | None
    n_sub: int | None
    c_sub: int | None
    batch_size: int
    seed: int


def settings(args) -> Settings:
    """The analysis's settings, checked: every refusal here comes before anything is loaded."""
    detectors = tuple(d.strip() for d in args.detectors.split(",") if d.strip())
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown or not detectors:
        raise UserError(f"unknown --detectors {','.join(unknown) or repr(args.detectors)}; "
                        f"choose from {', '.join(DETECTORS)}")
    if args.visual_dataset not in (AUTO,) + TRAIN_SPLITS:
        raise UserError(f"the training-set detectors score bd_train or subset, not {args.visual_dataset}"
                        f"{' (it has no poisoned training samples)' if args.visual_dataset == 'clean_train' else ''}; "
                        f"pass --visual_dataset bd_train or subset (STRIP always scores mixed)")
    for check, (test, refusal) in CHECKS.items():
        for name, _, _, kind, _ in (flag for flags in FLAGS.values() for flag in flags):
            value = getattr(args, name)
            if kind == check and value is not None and not test(value):
                raise UserError(f"--{name} {value} {refusal}")
    flags = {f.name: getattr(args, f.name) for f in fields(Settings) if f.name not in ("detectors", "split")}
    return Settings(detectors=detectors, split=args.visual_dataset, **flags)


# --- compute ---------------------------------------------------------------------------------
@dataclass
class Scored:
    """One split's samples with every detector's scores on them."""
    split: str
    indices: np.ndarray
    labels: np.ndarray
    original_labels: np.ndarray
    predicted: np.ndarray
    groups: np.ndarray
    detections: dict  # detector -> Detection


@dataclass
class DetectResult:
    record: str
    model: str  # "attack" or "defense"
    target: int | None
    class_names: tuple
    settings: Settings
    layer: str | None = None
    feature_dim: int | None = None
    poison_ratio: float | None = None
    train: Scored | None = None
    strip: Scored | None = None
    strip_threshold: float | None = None
    strip_overlays: int = 0
    strip_calibration: int = 0
    cleanse: Cleanse | None = None
    footprint: np.ndarray | None = None
    footprint_pairs: int = 0
    mask_iou: float | None = None
    metrics: dict = field(default_factory=dict)  # detector -> evaluate()
    notes: list = field(default_factory=list)


def record_poison_ratio(record, target) -> float:
    """Share of the full training set that is poisoned (cross samples not counted): the attack's pratio."""
    state = record.bd_train
    groups = sample_groups(state.bd_label, state.original_label, np.ones(len(state.poison_index), bool), target)
    return float((groups == POISONED).sum() / len(state.indicator))


def penultimate_batches(model, loader, layer: str, device):
    """Yield (batch, {layer: its input, "__logits__": logits}) for one pass, like backdoor_lens.stats.features.iterate,
    which records outputs: a pre-hook takes the input of the last Linear, the penultimate representation."""
    captured = {}
    handle = get_layer(model, layer).register_forward_pre_hook(
        lambda module, inputs: captured.__setitem__(layer, inputs[0].detach().clone()))
    model.eval()
    try:
        with torch.inference_mode():
            for batch in progress(loader, "detect: features"):
                logits = model(batch[0].to(device, non_blocking=True))
                yield batch, {layer: captured[layer], "__logits__": logits}
    finally:
        handle.remove()


def training_features(model, loader, layer: str, penultimate: bool, pool: str, device):
    """One pass: (features N x D, predicted classes), in the loader's order. Under `backdoor-lens
    all` the penultimate features and logits come from the split's shared pass."""
    shared = shared_outputs(model, loader, device, "detect: features") if penultimate else None
    if shared is not None and shared.penultimate_layer == layer and len(shared.penultimate) == len(shared.logits):
        batches = ((None, {layer: f, "__logits__": logits}) for f, logits in zip(shared.penultimate, shared.logits))
    elif penultimate:
        batches = penultimate_batches(model, loader, layer, device)
    else:
        batches = iterate(model, loader, [layer], device, desc="detect: features")
    feats, preds = [], []
    for _, outputs in batches:
        feats.append(pooled(outputs[layer], pool).double().cpu())
        preds.append(outputs["__logits__"].argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def compute_training(ctx, s: Settings, result: DetectResult):
    if s.split == AUTO and ctx.record.bd_train is None:
        result.notes.append("this record poisons through training (no bd_train): the training-set detectors "
                            "are skipped")
        return
    name = ctx.split_name()
    split = ctx.use_split(name)
    groups = sample_groups(split.labels, split.original_labels, split.poison, ctx.target_class)
    if not (groups == POISONED).any():
        raise UserError(f"the training-set detectors need poisoned samples; split {name} has none"
                        f"{' after --n_sub/--c_sub' if s.n_sub or s.c_sub else ''}; raise --n_sub or use bd_train")
    model = ctx.model
    named = ctx.args.target_layer_name
    layer = named or penultimate_layer(model)
    get_layer(model, layer)
    features, predicted = training_features(model, ctx.loader(split), layer, penultimate=not named, pool=s.pool,
                                            device=ctx.device)
    labels = split.labels
    eps = record_poison_ratio(ctx.record, ctx.target_class)
    detections = {}
    if "ac" in s.detectors:
        detections["ac"] = activation_clustering(features, predicted, s.ac_dim, s.ac_size_threshold, s.seed)
    if "ss" in s.detectors:
        detections["ss"] = spectral_signature(features, labels, eps)
    if "spectre" in s.detectors:
        detections["spectre"] = spectre(features, labels, eps, s.spectre_dim, seed=s.seed)
    if "mahalanobis" in s.detectors:
        detections["mahalanobis"] = mahalanobis(features, labels)
    result.layer = layer if named else f"{layer} (input)"
    result.feature_dim, result.poison_ratio = int(features.shape[1]), eps
    result.train = Scored(split.name, split.indices, labels, split.original_labels, predicted, groups, detections)


def clean_train_pixels(ctx, counts: list, seed: int) -> list:
    """Disjoint random sets of clean training images (pixel space), one per count, as large as the split allows."""
    split = ctx.get_split("clean_train").pixels()
    order = np.random.default_rng(seed).permutation(len(split))
    sets, start = [], 0
    for count in counts:
        take = order[start:start + count]
        start += len(take)
        sets.append(split.batch(take)[0] if len(take) else None)
    return sets


def compute_strip(ctx, s: Settings, result: DetectResult):
    if ctx.record.bd_test is None:
        result.notes.append("STRIP skipped: the record has no poisoned test samples (bd_test) to build mixed from")
        return
    mixed = ctx.get_split("mixed")
    rng = np.random.default_rng(s.seed)
    positions = stratified_positions(mixed, s.strip_inputs, rng)
    overlays, calibration = clean_train_pixels(ctx, [s.strip_overlays, s.strip_clean], s.seed)
    if calibration is None:
        raise UserError(f"STRIP needs clean training images besides its {s.strip_overlays} overlays to set its "
                        f"threshold; the training set has only {len(overlays)}; lower --strip_overlays")
    model, normalize = ctx.model, ctx.transform.normalize
    inputs = mixed.pixels().batch(positions)[0]
    entropy = strip_entropy(model, inputs, overlays, normalize, ctx.device, s.batch_size, "detect: STRIP")
    clean_entropy = strip_entropy(model, calibration, overlays, normalize, ctx.device, s.batch_size,
                                  "detect: STRIP threshold")
    threshold = strip_threshold(clean_entropy, s.strip_frr)
    labels, originals, poison = mixed.labels[positions], mixed.original_labels[positions], mixed.poison[positions]
    with torch.inference_mode():
        predicted = torch.cat([model(normalize(inputs[i:i + s.batch_size].to(ctx.device))).argmax(1).cpu()
                               for i in range(0, len(inputs), s.batch_size)]).numpy()
    result.strip = Scored("mixed", mixed.indices[positions], labels, originals, predicted,
                          sample_groups(labels, originals, poison, ctx.target_class),
                          {"strip": Detection(-entropy, entropy < threshold)})
    result.strip_threshold, result.strip_overlays, result.strip_calibration = threshold, len(overlays), len(calibration)
    if ctx.split is None:
        ctx.split = mixed.take(positions)


def trigger_footprint(ctx, seed: int) -> tuple[np.ndarray | None, int]:
    """Pixels where most of up to FOOTPRINT_PAIRS poisoned images differ from their clean twins."""
    name = "bd_test" if ctx.record.bd_test is not None else "bd_train"
    split = ctx.get_split(name)
    poisoned = np.flatnonzero(split.poison)
    if len(poisoned) == 0:
        return None, 0
    chosen = np.sort(np.random.default_rng(seed).choice(poisoned, min(FOOTPRINT_PAIRS, len(poisoned)), replace=False))
    masks = split_footprints(split, chosen)
    return masks.mean(axis=0) >= 0.5, len(chosen)


def nc_classes(num_classes: int, limit: int | None, target: int | None) -> np.ndarray:
    """All classes, or the first `limit` with the target among them."""
    return np.arange(num_classes) if limit is None else kept_classes(num_classes, limit, target)


def compute_cleanse(ctx, s: Settings, result: DetectResult):
    split = ctx.get_split("clean_test").pixels()
    positions = stratified_positions(split, s.nc_images, np.random.default_rng(s.seed))
    images = split.batch(positions)[0]
    classes = nc_classes(ctx.num_classes, s.nc_classes, ctx.target_class)
    result.cleanse = reverse_engineer(ctx.model, images, classes, ctx.transform.normalize, ctx.device, steps=s.nc_steps,
                                      batch_size=s.nc_batch, lr=s.nc_lr, cost=s.nc_cost, seed=s.seed,
                                      desc="detect: Neural Cleanse")
    result.footprint, result.footprint_pairs = trigger_footprint(ctx, s.seed)
    target = ctx.target_class
    if result.footprint is not None and result.footprint.any() and target is not None and target in classes:
        mask = result.cleanse.masks[int(np.flatnonzero(classes == target)[0])]
        result.mask_iou = localisation(mask, result.footprint).iou


def compute(ctx, s: Settings) -> DetectResult:
    """Every requested detector on the context's model, scored against the record's truth."""
    result = DetectResult(record=ctx.record.name, model=ctx.model_label, target=ctx.target_class,
                          class_names=tuple(ctx.class_names), settings=s)
    if any(d in s.detectors for d in TRAIN_DETECTORS):
        compute_training(ctx, s, result)
    if "strip" in s.detectors:
        compute_strip(ctx, s, result)
    if "nc" in s.detectors:
        compute_cleanse(ctx, s, result)
    if result.train is None and result.strip is None and result.cleanse is None:
        raise UserError(f"none of --detectors {','.join(s.detectors)} can run on this record "
                        f"({'; '.join(result.notes)}); add strip or nc")
    for scored in (result.train, result.strip):
        if scored is not None:
            for name, detection in scored.detections.items():
                result.metrics[name] = evaluate(detection.scores, scored.groups, detection.flags)
    return result


# --- write -----------------------------------------------------------------------------------
def summary_numbers(result: DetectResult) -> dict:
    """summary.json: the model, layer and poison ratio, every detector's numbers, the best one, Neural Cleanse's."""
    numbers = {"model": result.model, "target": result.target, "layer": result.layer,
               "poison_ratio": result.poison_ratio, "notes": result.notes}
    if result.train is not None:
        numbers.update(split=result.train.split, samples=int(len(result.train.groups)),
                       poisoned=int((result.train.groups == POISONED).sum()),
                       cross=int((result.train.groups == CROSS).sum()))
    if result.strip is not None:
        numbers.update(strip_inputs=int(len(result.strip.groups)), strip_threshold_bits=result.strip_threshold)
    for name, m in result.metrics.items():
        for key in ("auroc", "ap", "tpr_at_1fpr", "tpr_at_5fpr", "rule_tpr", "rule_fpr"):
            numbers[f"{key}_{name}"] = m[key]
    ranked = {name: m["auroc"] for name, m in result.metrics.items() if m["auroc"] is not None}
    if ranked:
        best = max(ranked, key=ranked.get)
        numbers.update(best_detector=best, best_auroc=ranked[best])
    if result.cleanse is not None:
        c = result.cleanse
        smallest = int(np.argmin(c.norms))
        numbers.update(nc_flagged_class=c.flagged, nc_min_norm_class=int(c.classes[smallest]),
                       nc_anomaly_index=float(c.anomaly[smallest]), nc_classes=int(len(c.classes)),
                       nc_mask_iou=result.mask_iou,
                       nc_footprint_pixels=int(result.footprint.sum()) if result.footprint is not None else None,
                       nc_footprint_share=float(result.footprint.mean()) if result.footprint is not None else None)
        if result.target is not None and result.target in c.classes:
            at = int(np.flatnonzero(c.classes == result.target)[0])
            numbers.update(nc_target_anomaly_index=float(c.anomaly[at]), nc_target_mask_l1=float(c.norms[at]))
    return numbers


def report_lines(result: DetectResult) -> list:
    lines = list(result.notes)
    for name, m in result.metrics.items():
        split = result.train.split if name in TRAIN_DETECTORS else "mixed"
        if m["auroc"] is None:
            lines.append(f"{TITLES[name]} on {split}: no clean or no poisoned sample to rank")
            continue
        cross = f", {m['cross']} cross left out" if m["cross"] else ""
        lines.append(f"{TITLES[name]} on {split} ({m['poisoned']} poisoned, {m['clean']} clean{cross}): "
                     f"AUROC {m['auroc']:.3f}, AP {m['ap']:.3f}, TPR at 1%/5% FPR {m['tpr_at_1fpr']:.2f}/"
                     f"{m['tpr_at_5fpr']:.2f}; its rule: TPR {fmt_rate(m['rule_tpr'])}, FPR {fmt_rate(m['rule_fpr'])}")
    if result.cleanse is not None:
        c = result.cleanse
        flagged = "none" if c.flagged is None else f"class {c.flagged}"
        line = (f"Neural Cleanse over {len(c.classes)} classes: flagged {flagged} (target {result.target}); "
                f"smallest mask {c.norms.min():.1f} px for class {int(c.classes[np.argmin(c.norms)])}, "
                f"anomaly index {c.anomaly[np.argmin(c.norms)]:.2f}")
        if result.mask_iou is not None:
            line += f"; IoU of the target's mask with the trigger footprint {result.mask_iou:.3f}"
            share = float(result.footprint.mean())
            if share >= WHOLE_IMAGE:
                line += (f" [the trigger changes {share:.0%} of the pixels: a whole-image trigger, which any large "
                         f"mask overlaps]")
        lines.append(line)
    return lines


def scores_table(result: DetectResult) -> pd.DataFrame:
    """One row per detector and sample; `poisoned` is empty for cross samples (neither poisoned nor clean)."""
    frames = []
    for scored in (result.train, result.strip):
        if scored is None:
            continue
        truth = pd.array(np.where(scored.groups == POISONED, 1, 0), dtype="Int64")
        truth[scored.groups == CROSS] = pd.NA
        for name, detection in scored.detections.items():
            frames.append(pd.DataFrame({
                "detector": name, "split": scored.split, "index": scored.indices, "score": detection.scores,
                "poisoned": truth, "group": [GROUP_NAMES[g] for g in scored.groups], "label": scored.labels,
                "original_label": scored.original_labels, "predicted": scored.predicted,
                "flagged": detection.flags.astype(int)}))
    return pd.concat(frames, ignore_index=True)


def summary_table(result: DetectResult) -> pd.DataFrame:
    s = result.settings
    rows = []
    for name, m in result.metrics.items():
        rows.append({"detector": name, "title": TITLES[name],
                     "split": result.train.split if name in TRAIN_DETECTORS else "mixed",
                     **{k: m[k] for k in ("auroc", "ap", "tpr_at_1fpr", "tpr_at_5fpr")},
                     "rule": RULES[name].format(size_threshold=s.ac_size_threshold, frr=s.strip_frr),
                     "rule_tpr": m["rule_tpr"], "rule_fpr": m["rule_fpr"], "poisoned": m["poisoned"],
                     "clean": m["clean"], "cross": m["cross"], "score": SCORE_MEANING[name]})
    return pd.DataFrame(rows)


def roc_table(result: DetectResult) -> pd.DataFrame:
    frames = [pd.DataFrame({"detector": name, "fpr": m["roc_fpr"], "tpr": m["roc_tpr"],
                            "threshold": m["roc_thresholds"]}) for name, m in result.metrics.items()]
    return pd.concat(frames, ignore_index=True)


def cleanse_table(result: DetectResult) -> pd.DataFrame:
    c = result.cleanse
    median = np.median(c.norms)
    return pd.DataFrame({"class": c.classes, "class_name": [result.class_names[k] for k in c.classes],
                         "mask_l1": c.norms, "anomaly_index": c.anomaly, "attack_success": c.success,
                         "below_median": (c.norms < median).astype(int),
                         "flagged": (c.classes == c.flagged).astype(int) if c.flagged is not None else 0,
                         "target": (c.classes == result.target).astype(int)})


def write(result: DetectResult, ctx) -> dict:
    out = ctx.out
    if result.metrics:
        out.save_csv("detect_scores", scores_table(result))
        out.save_csv("detect_summary", summary_table(result))
        out.save_csv("detect_roc", roc_table(result))
        out.save_figure(draw_scores(result), "detect_roc")
    if result.cleanse is not None:
        out.save_csv("detect_nc", cleanse_table(result))
        out.save_figure(draw_cleanse(result), "detect_nc")
    for line in report_lines(result):
        print(line)
    return summary_numbers(result)


def key_numbers(folder) -> list:
    """The report's key-number lines, read back from the written summary.json."""
    s = read_summary(folder)
    detectors = [k[len("auroc_"):] for k, v in s.items() if k.startswith("auroc_") and v is not None]
    rows = [("poison detectors: AUROC (AP)", ", ".join(f"{d} {fmt(s[f'auroc_{d}'])} ({fmt(s.get(f'ap_{d}'))})"
                                                       for d in detectors))] if detectors else []
    if "nc_flagged_class" in s:
        rows.append(("Neural Cleanse", f"flagged class {s['nc_flagged_class']} (target {s.get('target')}), "
                                       f"smallest-mask anomaly index {fmt(s.get('nc_anomaly_index'))}, "
                                       f"target mask IoU with the trigger {fmt(s.get('nc_mask_iou'))}"))
    return rows


ANALYSIS = Analysis(
    name="detect", title="Poison detectors vs ground truth", order=19,
    guide="A ROC curve hugging the top-left corner (AUROC near 1) and poisoned scores apart from the clean ones in "
          "the histograms mean the detector finds the poison; the summary CSV also gives each detector's own "
          "decision rule's TPR and FPR. Neural Cleanse flags a class whose smallest trigger mask is anomalously "
          "small (index above 2); the recovered mask is drawn beside the true trigger footprint.",
    shows="the standard poison detectors (Activation Clustering, Spectral Signatures, SPECTRE, Mahalanobis, STRIP, "
          "Neural Cleanse) scored against the record's known poisoned samples",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=key_numbers,
    # "auto": bd_train when the record has it; without it the training-set detectors are skipped.
    splits=TRAIN_SPLITS, default_split=AUTO, needs_poison=True, on_blended_demo=True,
    # Half the Neural Cleanse steps (half of detect's largest cost) at a larger Adam step: on the
    # BadNets demo the target is flagged (anomaly index 2.89, mask IoU 0.5; 4.22 with 80 steps at
    # 0.3, but 1.90 with 40 steps at 0.3, unflagged). The Blended demo's whole-image trigger is not
    # (1.69; 3.82 at 0.3): NC looks for a small mask, and which whole-image trigger it finds varies.
    demo_args=("--nc_steps", "40", "--nc_lr", "0.5"),
    quick_args=("--n_sub", "24", "--strip_inputs", "8", "--strip_overlays", "2", "--strip_clean", "4",
                "--nc_images", "4", "--nc_batch", "4", "--nc_steps", "2", "--nc_classes", "3"))
