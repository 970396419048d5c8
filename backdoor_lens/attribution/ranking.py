"""Casper et al.'s attribution benchmark as a ranking: which method beats the baselines, and how surely.

Casper et al. ("Benchmarking Interpretability Tools for Deep Neural Networks"; final version "Red
Teaming Deep Neural Networks with Feature Synthesis Tools", NeurIPS 2023) scored Captum's
attribution methods by how well their maps of triggered images match the trojan trigger's
footprint, against a blank map and an edge detector: first by the L1 distance to the footprint,
then by the correlation with it. Here the footprints are the record's own (backdoor_lens/attribution/footprint.py
defines the scores and the baselines); this module turns the per-image scores into a ranking.

For each method and score: the mean over images with a 95% percentile-bootstrap interval
(images resampled with replacement), and, for each baseline, whether the method beats it: the
95% bootstrap interval of the paired mean difference (method minus baseline on the same images,
signed so that positive is better) lies above 0. With fewer than two images there is no interval
and no verdict (NaN, None). Pure math: no drawing, no files.
"""
import numpy as np
import pandas as pd

from backdoor_lens.attribution.footprint import BASELINES, LOWER_IS_BETTER, SCORES

LEVEL = 0.95
DEFAULT_RESAMPLES = 2000


def bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of the rows of `values` (n or n x m)."""
    values = np.asarray(values, dtype=np.float64)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(axis=1)


def interval(means: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return float(low), float(high)


def rank_methods(rows: list[dict], scores=SCORES, baselines=BASELINES, pair_by=("model", "position"),
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[dict]:
    """One row per method (baselines included) and score of the per-image `rows` of
    footprint.score_maps: method, score, images, mean, low, high, and per baseline present
    `beats_<baseline>` (True, False, or None without an interval) and `difference_<baseline>` (the
    mean paired difference, positive = better than the baseline). Images whose score is NaN (empty
    footprint) are left out."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return []
    keys = [k for k in pair_by if k in frame.columns]
    if not keys:
        raise ValueError(f"the rows carry none of the keys {pair_by} that pair a method's image with a baseline's")
    rng = np.random.default_rng(seed)
    present = [b for b in baselines if b in set(frame["method"])]
    out = []
    for score in scores:
        sign = -1.0 if score in LOWER_IS_BETTER else 1.0
        table = frame.set_index(keys + ["method"])[score].unstack("method")  # one row per image
        for method in dict.fromkeys(frame["method"]):
            values = table[method].dropna().to_numpy()
            entry = {"method": method, "score": score, "images": int(len(values)),
                     "mean": float(values.mean()) if len(values) else float("nan"),
                     "low": float("nan"), "high": float("nan")}
            if len(values) >= 2:
                entry["low"], entry["high"] = interval(bootstrap_means(values, resamples, rng), level)
            for base in present:
                if base == method:
                    entry[f"difference_{base}"], entry[f"beats_{base}"] = 0.0, None
                    continue
                pairs = table[[method, base]].dropna().to_numpy()
                differences = sign * (pairs[:, 0] - pairs[:, 1])
                entry[f"difference_{base}"] = float(differences.mean()) if len(differences) else float("nan")
                entry[f"beats_{base}"] = (interval(bootstrap_means(differences, resamples, rng), level)[0] > 0
                                          if len(differences) >= 2 else None)
            out.append(entry)
    return out


def ordered(ranking: list[dict], score: str = "correlation") -> list[dict]:
    """The ranking's rows of one score, best first (NaN means last)."""
    part = [r for r in ranking if r["score"] == score]
    better = (lambda r: r["mean"]) if score in LOWER_IS_BETTER else (lambda r: -r["mean"])
    return sorted(part, key=lambda r: (np.isnan(r["mean"]), better(r) if not np.isnan(r["mean"]) else 0.0))
