"""Trigger footprints and how well an attribution map localises them.

Every poisoned sample in a record has a clean twin (same original index, served clean), so the
trigger's footprint is known exactly: the pixels where the poisoned image differs from its twin
by more than `tolerance` in some channel (pixel space [0, 1]; the default, 1.5/255, ignores the
one-grey-level differences that rounding a float trigger to a uint8 PNG leaves).

An attribution map A (any shape C x h x w or h x w) is first reduced to a non-negative H x W map
a = resize(sum_c |A_c|) (bilinear to the image size). Against a footprint M (|M| pixels of N):

- share    = sum_{p in M} a_p / sum_p a_p                  (mass inside the footprint)
- pointing = |argmax(a) & M| / |argmax(a)|                  (pointing game; argmax is the set of
             maximal pixels, so ties count as the expected hit of a random tie-break)
- iou      = I / (k + |M| - I), the IoU of the top-k pixels with M, k = |M| or `topk_percent`
             of N. Ties at the k-th largest value are broken at random, in expectation: every
             pixel above it counts fully, and each of the t pixels tied at it gets credit
             (k - #above) / t, so I = |above & M| + (k - #above) |tied & M| / t is the expected
             number of top-k pixels inside M. A map is scored by its support: one with fewer than
             k non-zero pixels, all in M, scores as it would with its zeros ranked at random.
- peak_distance = mean over the maximal pixels of their Euclidean distance (pixels) to the
             nearest footprint pixel (0 inside): how far off a map points when it misses.
- correlation = Pearson correlation over the pixels of a with M (as 0/1): Casper et al.'s final
             score. A constant map has no correlation with anything: it scores 0.
- l1       = mean over the pixels of |a' - M|, a' = a min-max scaled to [0, 1] (a constant map
             scales to 0): Casper et al.'s first score, the L1 distance to the footprint, divided
             by N so that image sizes compare. Lower is better; an all-zero map scores |M| / N.

Baselines, scored on the same footprints: a blank (uniform) map, a seeded random map, and, given
the images, an edge detector (Sobel magnitude of the image, see `edge_map`). The blank map ranks
no pixel above another, so it scores what a random ranking scores: |M| / N on share and pointing,
k|M|/N / (k + |M| - k|M|/N) on IoU (the chance level of IoU, below |M| / N), 0 on correlation and
|M| / N on l1. A map equal to M scores 1 (0 on l1). An all-zero map is treated as blank. A sample
whose footprint is empty gets NaN scores.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate1d, distance_transform_edt

DEFAULT_TOLERANCE = 1.5 / 255
SCORES = ("share", "pointing", "iou", "peak_distance", "correlation", "l1")
LOWER_IS_BETTER = ("peak_distance", "l1")
BASELINES = ("blank", "random", "edge")
WHOLE_IMAGE = 0.5  # footprints at least this share of the image are not localisable


# --- footprints ------------------------------------------------------------------------------
def footprint_mask(poisoned: torch.Tensor, clean: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Pixels where a poisoned image differs from its clean twin: (N x) C x H x W -> (N x) H x W bool."""
    poisoned, clean = torch.as_tensor(poisoned).float(), torch.as_tensor(clean).float()
    if poisoned.shape != clean.shape:
        raise ValueError(f"poisoned {tuple(poisoned.shape)} and clean {tuple(clean.shape)} images differ in shape")
    return ((poisoned - clean).abs().amax(dim=-3) > tolerance).cpu().numpy()


def split_footprints(split, positions, tolerance: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Footprints of the samples at `positions` of a Split (empty for clean samples): K x H x W bool."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) == 0:
        h, w = split.transform.size
        return np.zeros((0, h, w), bool)
    poisoned = split.pixels().batch(positions)[0]
    clean = split.clean_twin().pixels().batch(positions)[0]
    masks = footprint_mask(poisoned, clean, tolerance)
    masks[~split.poison[positions]] = False
    return masks


# --- maps ------------------------------------------------------------------------------------
def reduce_map(attribution, size) -> np.ndarray:
    """(N x) [C x] h x w attribution -> (N x) H x W non-negative map: |.| summed over channels, resized.

    A 2-D input is one map, a 3-D one C x h x w, a 4-D one N x C x h x w.
    """
    a = torch.as_tensor(np.asarray(attribution) if not torch.is_tensor(attribution) else attribution)
    a = a.detach().double().cpu()
    single = a.dim() <= 3
    if a.dim() == 2:
        a = a[None, None]
    elif a.dim() == 3:
        a = a[None]
    elif a.dim() != 4:
        raise ValueError(f"an attribution map has 2 to 4 dimensions, not {a.dim()}")
    a = a.abs().sum(dim=1, keepdim=True)
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False).clamp_min(0)
    out = a[:, 0].numpy()
    return out[0] if single else out


def blank_map(size) -> np.ndarray:
    return np.ones(tuple(size))


def random_map(size, rng: np.random.Generator) -> np.ndarray:
    return rng.random(tuple(size))


def edge_map(image) -> np.ndarray:
    """The edge-detector baseline: Sobel gradient magnitude of a (N x) C x H x W image in pixel space,
    sqrt(Gx^2 + Gy^2) per channel (borders replicated) summed over channels -> (N x) H x W.

    Gx correlates each channel with [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], Gy with its transpose; a
    trigger with sharp borders (a patch) lights up here without any model, which is what makes it
    a baseline an attribution method must beat.
    """
    image = np.asarray(torch.as_tensor(image).detach().cpu().double())
    if image.ndim not in (3, 4):
        raise ValueError(f"an image has 3 (C x H x W) or 4 (N x C x H x W) dimensions, not {image.ndim}")
    # derivative along one spatial axis, smoothing along the other only (scipy's `sobel` would also
    # smooth across channels and images)
    derivative, smoothing = [-1.0, 0.0, 1.0], [1.0, 2.0, 1.0]
    gx = correlate1d(correlate1d(image, derivative, axis=-1, mode="nearest"), smoothing, axis=-2, mode="nearest")
    gy = correlate1d(correlate1d(image, derivative, axis=-2, mode="nearest"), smoothing, axis=-1, mode="nearest")
    return np.hypot(gx, gy).sum(axis=-3)


# --- scores ----------------------------------------------------------------------------------
@dataclass
class Localisation:
    share: float
    pointing: float
    iou: float
    peak_distance: float
    correlation: float
    l1: float
    k: int  # pixels in the top-k set asked for
    footprint_pixels: int
    footprint_share: float  # |M| / N: the blank map's share and pointing, the chance level

    def as_dict(self) -> dict:
        return {"share": self.share, "pointing": self.pointing, "iou": self.iou,
                "peak_distance": self.peak_distance, "correlation": self.correlation, "l1": self.l1,
                "k": self.k, "footprint_pixels": self.footprint_pixels, "footprint_share": self.footprint_share}


def topk_count(mask: np.ndarray, topk_percent: float | None) -> int:
    if topk_percent is None:
        return int(mask.sum())
    return max(1, int(round(topk_percent / 100.0 * mask.size)))


def expected_topk_inside(a: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Expected number of the k largest pixels of `a` inside `mask` when the pixels tied at the k-th
    largest value are drawn at random: each of them gets credit (k - #above) / #tied."""
    flat = a.ravel()
    threshold = np.partition(flat, flat.size - k)[flat.size - k]
    above = a > threshold
    tied = a == threshold
    places_left = k - int(above.sum())
    return float((above & mask).sum() + places_left * (tied & mask).sum() / tied.sum())


def correlation(a: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of a map with a 0/1 footprint over the pixels; 0 when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    m = np.asarray(mask, dtype=np.float64).ravel()
    a, m = a - a.mean(), m - m.mean()
    norm = np.sqrt((a * a).sum() * (m * m).sum())
    return float((a * m).sum() / norm) if norm > 0 else 0.0


def l1_distance(a: np.ndarray, mask: np.ndarray) -> float:
    """Mean |a' - M| over the pixels, a' = a min-max scaled to [0, 1] (a constant map: 0)."""
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    scaled = (a - a.min()) / span if span > 0 else np.zeros_like(a)
    return float(np.abs(scaled - mask).mean())


def localisation(attribution_map: np.ndarray, mask: np.ndarray, topk_percent: float | None = None) -> Localisation:
    """The scores of one reduced H x W map against one H x W footprint (see module doc)."""
    a = np.asarray(attribution_map, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if a.shape != mask.shape:
        raise ValueError(f"map {a.shape} and footprint {mask.shape} differ in shape")
    area = int(mask.sum())
    k = topk_count(mask, topk_percent)
    if area == 0:
        nan = float("nan")
        return Localisation(nan, nan, nan, nan, nan, nan, k, 0, 0.0)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    a = np.abs(a)
    total = a.sum()
    if total <= 0:
        a, total = np.ones_like(a), float(a.size)
    share = float(a[mask].sum() / total)
    peak = a == a.max()
    pointing = float((peak & mask).sum() / peak.sum())
    inside = expected_topk_inside(a, mask, k)
    iou = inside / (k + area - inside)
    distance = float(distance_transform_edt(~mask)[peak].mean())
    return Localisation(share, pointing, iou, distance, correlation(a, mask), l1_distance(a, mask), k, area,
                        area / mask.size)


def score_maps(maps: np.ndarray, masks: np.ndarray, method: str, meta: list[dict] | None = None,
               topk_percent: float | None = None, seed: int = 0, baselines: bool = True,
               images: np.ndarray | None = None) -> list[dict]:
    """Rows (one per image and map kind) of the scores of `maps` (N x H x W, reduced) and, with
    `baselines`, of a blank and a seeded random map on the same footprints, and of the edge detector
    when the `images` (N x C x H x W, pixel space) are given."""
    rows = []
    rng = np.random.default_rng(seed)
    meta = meta or [{} for _ in range(len(maps))]
    edges = edge_map(images) if baselines and images is not None and len(images) else None
    for i, (a, mask, info) in enumerate(zip(maps, masks, meta)):
        kinds = [(method, a)]
        if baselines:
            kinds += [("blank", blank_map(mask.shape)), ("random", random_map(mask.shape, rng))]
            if edges is not None:
                kinds.append(("edge", edges[i]))
        for name, m in kinds:
            rows.append({**info, "method": name, **localisation(m, mask, topk_percent).as_dict()})
    return rows


def summarize(rows: list[dict], by=("model", "method")) -> list[dict]:
    """Mean, and standard error of the mean, of each score per group; NaN rows (empty footprints) left out."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame.empty:
        return []
    keys = [k for k in by if k in frame.columns]
    frame = frame.dropna(subset=list(SCORES))
    out = []
    for group, part in frame.groupby(keys, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        entry = dict(zip(keys, group))
        entry["images"] = int(len(part))
        for score in SCORES:
            values = part[score].to_numpy(dtype=float)
            entry[score] = float(values.mean())
            entry[f"{score}_sem"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
        entry["footprint_pixels"] = float(part["footprint_pixels"].mean())
        entry["footprint_share"] = float(part["footprint_share"].mean())
        out.append(entry)
    return out


def describe(summary: list[dict], method: str, label: str = "", **match) -> str:
    """One line: a method's mean scores next to the blank and random baselines, for the summary rows
    whose keys equal `match` (e.g. model="attack")."""
    rows = {r["method"]: r for r in summary if all(r.get(k) == v for k, v in match.items())}
    who = f"{label}: " if label else ""
    if method not in rows:
        return f"{who}{method}: no poisoned image with a non-empty trigger footprint was scored"
    m = rows[method]
    parts = []
    for score, name in (("pointing", "pointing game"), ("share", "in-footprint share"), ("iou", "top-k IoU"),
                        ("correlation", "correlation"), ("peak_distance", "peak distance px")):
        base = ", ".join(f"{b} {rows[b][score]:.3f}" for b in BASELINES if b in rows)
        parts.append(f"{name} {m[score]:.3f} ({base})")
    line = f"{who}{method} on {m['images']} poisoned images: " + "; ".join(parts)
    if m["footprint_share"] >= WHOLE_IMAGE:
        line += (f" [the trigger changes {m['footprint_share']:.0%} of the pixels: a whole-image trigger, which no "
                 f"map can localise much better than a blank one]")
    return line
