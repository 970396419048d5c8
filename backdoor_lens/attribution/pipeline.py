"""The pipeline that gradcam, saliency, shap and fre share; each analysis supplies its explain step
and its figure.

1. choose images (`choose`): the analysed split, through the Context's one split mechanism, and a
   seeded choice of up to n clean and m poisoned samples of it; the trigger footprint of every
   poisoned one is its difference from its clean twin (footprint.py);
2. explain: the analysis's own step (CAMs, Captum methods, SHAP values, input gradients), usually
   of the class `classes` names (the prediction, the true class or the attack target);
3. score (`score`): each map of a poisoned image against its footprint, next to a blank map, a
   seeded random map and, given the images, an edge detector (footprint.score_maps);
4. write (`write_localisation`, `save_pages`): the per-image localisation table, its means per
   group, one printed line per map kind against the baselines; the figure's pages.

No drawing here; the figures are backdoor_lens/plot/attribution.py's.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from backdoor_lens.attribution.explainers import explained_classes, predict_batch
from backdoor_lens.attribution.footprint import DEFAULT_TOLERANCE, describe, score_maps, split_footprints, summarize
from backdoor_lens.errors import UserError
from backdoor_lens.record.splits import AUTO, Split

# The splits the four analyses read, in order of preference: poisoned and clean test images side by
# side first; on a record without poisoned test samples the default falls back to the first split of
# these the record has (clean_test), with a note.
SPLITS = ("mixed", "bd_test", "clean_test", "bd_train", "clean_train", "subset")
DEFAULT_SPLIT = "mixed"


# --- settings ----------------------------------------------------------------------------------
def add_localisation_arguments(parser):
    group = parser.add_argument_group("trigger localisation")
    group.add_argument("--topk_percent", type=float,
                       help="IoU of the top k%% of pixels with the footprint (default: k = footprint size)")
    group.add_argument("--footprint_tolerance", type=float, default=DEFAULT_TOLERANCE * 255,
                       help="grey levels (of 255) a pixel must differ from the clean twin by to be trigger")


@dataclass(frozen=True)
class Localise:
    """How maps are scored: top-k IoU over k = topk_percent of the pixels (None: k = footprint size),
    footprints at `tolerance_levels` grey levels (of 255), random baseline and image choice seeded."""
    topk_percent: float | None = None
    tolerance_levels: float = DEFAULT_TOLERANCE * 255
    seed: int = 0

    def __post_init__(self):
        if self.topk_percent is not None and not 0 < self.topk_percent <= 100:
            raise UserError(f"--topk_percent {self.topk_percent} must lie in (0, 100]")
        if not 0 <= self.tolerance_levels < 255:
            raise UserError(f"--footprint_tolerance {self.tolerance_levels} must lie in [0, 255)")

    @property
    def tolerance(self) -> float:
        """In pixel space [0, 1]."""
        return self.tolerance_levels / 255.0


# --- 1. choose images --------------------------------------------------------------------------
@dataclass
class Images:
    """The images an attribution analysis explains: the clean ones, then the poisoned ones."""
    split: Split  # the split they come from
    note: str | None  # why the split is not the one asked for, or None
    clean: np.ndarray  # positions in the split, sorted
    poisoned: np.ndarray  # positions in the split, sorted
    x: torch.Tensor  # model input, N x C x H x W, clean first
    display: torch.Tensor  # the same in pixel space [0, 1], for the figures
    footprints: np.ndarray  # K x H x W bool: the trigger footprint of each poisoned image
    # per row (clean first): position in the split, poison flag, served and original label, dataset index
    positions: np.ndarray = field(init=False)
    poison: np.ndarray = field(init=False)
    labels: np.ndarray = field(init=False)
    original_labels: np.ndarray = field(init=False)
    original_index: np.ndarray = field(init=False)

    def __post_init__(self):
        self.positions = np.concatenate([self.clean, self.poisoned])
        self.poison, self.labels, self.original_labels, self.original_index = (
            getattr(self.split, name)[self.positions] for name in ("poison", "labels", "original_labels", "indices"))

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def n_clean(self) -> int:
        return len(self.clean)

    @property
    def size(self) -> tuple:
        return tuple(self.split.transform.size)

    def footprint(self, i: int) -> np.ndarray | None:
        """The footprint of row i, None for a clean image."""
        return self.footprints[i - self.n_clean] if i >= self.n_clean else None

    def shown(self, n_poisoned: int) -> np.ndarray:
        """Rows a figure shows: every clean image and the first n_poisoned poisoned ones."""
        return np.arange(self.n_clean + min(max(n_poisoned, 0), len(self.poisoned)))

    def meta(self, model: str, explained, predicted=None, **extra) -> list[dict]:
        """The identifying columns of each poisoned image's localisation rows; `explained` and
        `predicted` hold a class per row of all N images (clean first)."""
        rows = []
        for i in range(self.n_clean, len(self)):
            row = {"model": model, "position": int(self.positions[i]), "original_index": int(self.original_index[i]),
                   "label": int(self.labels[i]), "original_label": int(self.original_labels[i])}
            if predicted is not None:
                row["predicted"] = int(predicted[i])
            row["explained"] = int(explained[i])
            rows.append({**row, **extra})
        return rows


def explained_split(ctx):
    """The analysed split and a note: the declared default (mixed) on a record without poisoned test
    samples falls back to the first declared split the record has, since a clean prototype can
    still be explained, only not scored. Returns (split, note or None)."""
    name = ctx.split_name()
    note = None
    if name == DEFAULT_SPLIT and ctx.record.bd_test is None:
        what = "clean prototype record" if ctx.record.kind == "prototype" else "record without poisoned test samples"
        note = (f"this {what} has no poisoned samples: explaining clean test images only "
                f"(no trigger footprint, so no localisation scores)")
        name = ctx.split_name(AUTO)
    return ctx.use_split(name), note


def pick_images(split, n_clean: int, n_poisoned: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of positions: up to n_clean clean and n_poisoned poisoned samples, each sorted."""
    rng = np.random.default_rng(seed)
    clean = np.flatnonzero(~split.poison)
    poisoned = np.flatnonzero(split.poison)
    pick = lambda pool, n: np.sort(rng.choice(pool, size=min(max(n, 0), len(pool)), replace=False))  # noqa: E731
    return pick(clean, n_clean), pick(poisoned, n_poisoned)


def choose(ctx, n_clean: int, n_poisoned: int, localise: Localise) -> Images:
    """Step 1: the split, the seeded images and the poisoned ones' footprints; refuses an empty choice."""
    split, note = explained_split(ctx)
    clean, poisoned = pick_images(split, n_clean, n_poisoned, localise.seed)
    if len(clean) + len(poisoned) == 0:
        raise UserError("no image to explain; raise --num_images")
    x = split.batch(np.concatenate([clean, poisoned]))[0]
    return Images(split, note, clean, poisoned, x, ctx.denormalize(x),
                  split_footprints(split, poisoned, localise.tolerance))


# --- 2. the class each map explains ------------------------------------------------------------
@dataclass
class Classes:
    """Per image: the model's prediction, its softmax probabilities (N x K) and the class explained."""
    predicted: np.ndarray
    probs: np.ndarray
    explained: np.ndarray


def classes(ctx, model, images: Images, target: str, batch_size: int) -> Classes:
    """The prediction of `model` on the images and the class to explain (--target)."""
    predicted, probs = predict_batch(model, images.x, batch_size)
    return Classes(predicted, probs, explained_classes(target, predicted, images.original_labels, ctx.target_class))


# --- 3. score against the footprints -----------------------------------------------------------
def score(images: Images, maps: dict, meta: list[dict], localise: Localise, edge: bool = False) -> list[dict]:
    """Rows of footprint.score_maps for {kind: N x H x W reduced maps of all the images}: the poisoned
    images' maps of every kind, and with the first kind the blank and random baselines (and with
    `edge` the edge detector of the images in pixel space). [] without poisoned images."""
    if not len(images.poisoned):
        return []
    pixels = images.split.pixels().batch(images.poisoned)[0] if edge else None
    rows = []
    for i, (kind, reduced) in enumerate(maps.items()):
        rows += score_maps(reduced[images.n_clean:], images.footprints, kind, meta, localise.topk_percent,
                           seed=localise.seed, baselines=i == 0, images=pixels)
    return rows


# --- 4. write ----------------------------------------------------------------------------------
def write_localisation(out, prefix: str, rows: list[dict], lines, summary: dict,
                       by=("model", "method")) -> list[dict] | None:
    """<prefix>_localisation.csv (one row per image and map) and <prefix>_localisation_summary.csv
    (means and SEM per `by` group), also summary["localisation"]; prints, for each (kind, label,
    match) of `lines`, the kind's scores next to the baselines among the summary rows matching
    `match`. Returns the summary rows; None, and nothing written, without poisoned images."""
    import pandas as pd

    if not rows:
        return None
    table = summary["localisation"] = summarize(rows, by=by)
    out.save_csv(f"{prefix}_localisation", pd.DataFrame(rows))
    out.save_csv(f"{prefix}_localisation_summary", pd.DataFrame(table))
    for kind, label, match in lines:
        print(describe(table, kind, label, **match))
    return table


def save_pages(out, figures, stem: str) -> list[str]:
    """Save the pages of a figure as stem.png, stem_p2.png, ...; returns the file names."""
    return [out.save_figure(fig, stem + (f"_p{n + 1}" if n else "")) for n, fig in enumerate(figures)]


def print_note(images: Images):
    if images.note:
        print(images.note)
