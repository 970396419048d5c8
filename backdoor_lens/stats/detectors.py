"""Poison detectors as pure math: a suspicion score per sample (higher = more suspect, for every
detector), each detector's own default decision rule, and the scores against the ground truth.

Training-set detectors, on N x D features of one layer (one row per training sample):

- Activation Clustering (Chen et al., 2018), per predicted class: the class's centred features
  are projected onto their top `dim` (10) principal axes; 2-means splits them; the smaller cluster
  is suspect. Chen et al. reduce with ICA, whose components are the principal components whitened
  and turned; 2-means is blind to the turn but not to the whitening, which shrinks a dominant
  poison direction to the unit variance of every noise direction, so that 2-means then often
  splits noise (it did on planted clusters); the principal components keep it dominant.
  Score: the signed distance from the boundary between the two centroids, along the centroid
  axis, towards the smaller cluster, in units of the within-cluster standard deviation along that
  axis (a clean, unimodal class splits with |score| of about 1 to 3; a separate poisoned cluster
  lies far out). Rule: the smaller cluster is flagged when it holds less than `size_threshold`
  (0.35) of its class (the relative-size rule of Chen et al.; 0.35 is IBM ART's default).
- Spectral Signatures (Tran et al., 2018), per served label: the squared projection of the class's
  centred features on their top right-singular vector. Rule: the 1.5 eps n_c largest scores of
  each class are removed, eps the poison ratio (Tran et al.; ART's `expected_pp_poison`).
- SPECTRE (Hayase et al., 2021), per served label: the class's centred features projected on their
  top `dim` singular directions (at most n_c / 10, so that the robust estimate has samples
  enough), whitened with a robust estimate of mean and covariance (here the Minimum Covariance
  Determinant, in place of the paper's filter estimator), and scored by QUE:
  tau_i = w_i' Q w_i, Q = exp(alpha (S - I) / (||S||_2 - 1)) / trace, S the second moment of the
  whitened features, alpha = 4. Rule: as Spectral Signatures, the 1.5 eps n_c largest per class.
- Mahalanobis baseline (class means with a tied covariance, as Lee et al., 2018): the squared
  distance of each sample to its served class's mean, under the covariance of all samples about
  their class means (Ledoit-Wolf shrinkage, since D may exceed N). Rule: scores above their
  mean + 3 std.

Input detector: STRIP (Gao et al., 2019). Each input x is superimposed with n held-out clean
images h_j as (x + h_j) / 2 (Gao et al. add at full weight and saturate; the mean stays in range)
and H(x) = 1/n sum_j -sum_c p_c log2 p_c over the model's softmax. A trigger that survives the
blend keeps the prediction fixed: low entropy. Score = -H (bits). Rule: H below the `frr`
quantile (1%) of the entropies of held-out clean inputs.

Model detector: Neural Cleanse (Wang et al., 2019). For each class k, a mask m (H x W, in [0, 1])
and a pattern p (C x H x W) are optimised with Adam so that (1 - m) x + m p is classified as k,
with cost lambda_k |m|_1 (NC's schedule: lambda_k x 1.5 after `patience` steps at >= 99% attack
success, / 1.5^1.5 otherwise); the smallest |m|_1 reached at >= 99% success is kept. NC runs
thousands of steps from lambda = 1e-3 and learning rate 0.1; for runs of ~100 steps the callers
start higher (backdoor_lens.analyses.detect: 1e-2 and 0.3) and the mask small (MASK_INIT). Anomaly
index of class k: |n_k - median| / (1.4826 MAD) of the norms; a class below the median with an
index above 2 is flagged (the most anomalous one).

Against the truth (poisoned = positive, clean = negative; WaNet/InputAware cross samples,
flagged but with their label kept, are neither and are left out): ROC, AUROC, average precision
(sklearn), TPR at a given FPR (the largest TPR among thresholds whose FPR does not exceed it),
and the TPR and FPR of the detector's own rule.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_lens.device import progress
from backdoor_lens.stats.embedding import CROSS, POISONED

TRAIN_DETECTORS = ("ac", "ss", "spectre", "mahalanobis")
INPUT_DETECTORS = ("strip",)
MODEL_DETECTORS = ("nc",)
DETECTORS = TRAIN_DETECTORS + INPUT_DETECTORS + MODEL_DETECTORS
TITLES = {"ac": "Activation Clustering", "ss": "Spectral Signatures", "spectre": "SPECTRE (robust)",
          "mahalanobis": "Mahalanobis (tied covariance)", "strip": "STRIP", "nc": "Neural Cleanse"}
RULES = {"ac": "smaller 2-means cluster of a class, if under {size_threshold:g} of it",
         "ss": "top 1.5 x poison ratio of each class", "spectre": "top 1.5 x poison ratio of each class",
         "mahalanobis": "score above mean + 3 std", "strip": "entropy below the {frr:g} quantile of clean inputs",
         "nc": "a class below the median norm with anomaly index > 2"}
SCORE_MEANING = {"ac": "distance into the smaller cluster (within-cluster std)",
                 "ss": "squared projection on the top singular vector", "spectre": "QUE score",
                 "mahalanobis": "squared Mahalanobis distance to the class mean",
                 "strip": "minus the mean entropy (bits) over superimpositions"}
POOR_RANK = 1e-10  # singular values below this share of the largest are treated as zero
SPECTRE_SAMPLES_PER_DIM = 10  # SPECTRE keeps at most n_c / 10 directions of a class of n_c samples
MAX_MAHALANOBIS_DIM = 2048  # beyond this, the tied covariance is estimated on the top principal axes
NC_SUCCESS = 0.99
MAD_SCALE = 1.4826  # makes the MAD a consistent estimate of a normal standard deviation
ANOMALY_THRESHOLD = 2.0
# Masks start uniform in [0, 0.1] (NC starts them in [0, 1]): a short run then grows the few pixels a
# trigger needs instead of spending its steps shrinking a half-image mask (on the demo's BadNets
# record, 60 to 100 steps found a 3- to 12-pixel mask for the target this way; 30 steps from [0, 1]
# left every mask above 350 pixels).
MASK_INIT = 0.1


@dataclass
class Detection:
    """Scores (higher = more suspect) and the rule's decisions for one detector, one entry per sample."""
    scores: np.ndarray
    flags: np.ndarray


# --- helpers ---------------------------------------------------------------------------------
def _class_positions(labels):
    """The positions of each class's samples, class by class."""
    labels = np.asarray(labels)
    for cls in np.unique(labels):
        yield np.flatnonzero(labels == cls)


def principal_axes(x: np.ndarray, dim: int) -> np.ndarray:
    """Centred x projected on its top min(dim, rank) right-singular vectors."""
    centred = x - x.mean(axis=0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    keep = sing > POOR_RANK * max(float(sing[0]) if len(sing) else 0.0, 1e-300)
    keep[dim:] = False
    return centred @ vt[keep].T


def top_share(scores: np.ndarray, share: float) -> np.ndarray:
    """Flags on the round(share * n) largest scores."""
    count = int(round(min(max(share, 0.0), 1.0) * len(scores)))
    flags = np.zeros(len(scores), bool)
    flags[np.argsort(-scores, kind="stable")[:count]] = True
    return flags


# --- training-set detectors ------------------------------------------------------------------
def activation_clustering(features, predicted, dim: int = 10, size_threshold: float = 0.35, seed: int = 0,
                          min_class: int = 4) -> Detection:
    """Per predicted class: top-`dim` principal components, 2-means, the smaller cluster suspect."""
    from sklearn.cluster import KMeans

    features = np.asarray(features, dtype=np.float64)
    scores, flags = np.zeros(len(features)), np.zeros(len(features), bool)
    for pos in _class_positions(predicted):
        if len(pos) < min_class:
            continue
        z = principal_axes(features[pos], dim)
        if z.shape[1] == 0:
            continue  # every sample of the class has the same features: nothing to split
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
        sizes = np.bincount(km.labels_, minlength=2)
        small = int(np.argmin(sizes))
        axis = km.cluster_centers_[small] - km.cluster_centers_[1 - small]
        gap = float(np.linalg.norm(axis))
        if sizes[small] == 0 or gap == 0:
            continue
        along = (z - km.cluster_centers_.mean(axis=0)) @ (axis / gap)
        centre = np.where(km.labels_ == small, gap / 2, -gap / 2)
        spread = float(np.sqrt(np.mean((along - centre) ** 2)))
        scores[pos] = along / max(spread, 1e-12 * gap)
        if sizes[small] / len(pos) < size_threshold:
            flags[pos[km.labels_ == small]] = True
    return Detection(scores, flags)


def spectral_signature(features, labels, poison_ratio: float, multiplier: float = 1.5) -> Detection:
    """Per served label: (centred features . top right-singular vector)^2; top 1.5 eps of each class flagged."""
    features = np.asarray(features, dtype=np.float64)
    scores, flags = np.zeros(len(features)), np.zeros(len(features), bool)
    for pos in _class_positions(labels):
        if len(pos) < 2:
            continue
        projected = principal_axes(features[pos], 1)
        if projected.shape[1] == 0:
            continue
        scores[pos] = projected[:, 0] ** 2
        flags[pos] = top_share(scores[pos], multiplier * poison_ratio)
    return Detection(scores, flags)


def que_scores(whitened: np.ndarray, alpha: float = 4.0) -> np.ndarray:
    """SPECTRE's QUantum Entropy scores w_i' Q w_i of whitened samples (rows)."""
    n, k = whitened.shape
    second = whitened.T @ whitened / n
    eigenvalues, vectors = np.linalg.eigh(second)
    top = float(eigenvalues[-1])
    if top <= 1 + 1e-9:
        # No direction is stretched beyond the robust estimate: the exponential weighs all alike.
        weights = np.ones(k)
    else:
        # exp(alpha (lambda - 1) / (top - 1)) scaled by exp(-alpha), so that the largest weight is 1.
        weights = np.exp(alpha * (eigenvalues - top) / (top - 1))
    q = (vectors * weights) @ vectors.T / weights.sum()
    return np.einsum("ij,jk,ik->i", whitened, q, whitened)


def spectre(features, labels, poison_ratio: float, dim: int = 32, alpha: float = 4.0, multiplier: float = 1.5,
            seed: int = 0) -> Detection:
    """Per served label: top-`dim` singular directions, robust (MCD) whitening, QUE scores."""
    from sklearn.covariance import MinCovDet

    features = np.asarray(features, dtype=np.float64)
    scores, flags = np.zeros(len(features)), np.zeros(len(features), bool)
    for pos in _class_positions(labels):
        # The MCD keeps about half of the samples; with fewer than ~10 per dimension it broke down on planted clusters.
        z = principal_axes(features[pos], min(dim, len(pos) // SPECTRE_SAMPLES_PER_DIM))
        if z.shape[1] == 0:
            continue
        mcd = MinCovDet(random_state=seed).fit(z)
        eigenvalues, vectors = np.linalg.eigh(mcd.covariance_)
        eigenvalues = np.maximum(eigenvalues, POOR_RANK * max(float(eigenvalues[-1]), 1e-300))
        whitened = (z - mcd.location_) @ vectors / np.sqrt(eigenvalues)
        scores[pos] = que_scores(whitened, alpha)
        flags[pos] = top_share(scores[pos], multiplier * poison_ratio)
    return Detection(scores, flags)


def mahalanobis(features, labels) -> Detection:
    """Squared distance to the served class's mean under the shrunk tied covariance; rule mean + 3 std."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    if x.shape[1] > MAX_MAHALANOBIS_DIM:
        x = principal_axes(x, MAX_MAHALANOBIS_DIM)
    residual = np.empty_like(x)
    for pos in _class_positions(labels):
        residual[pos] = x[pos] - x[pos].mean(axis=0)
    precision = LedoitWolf(assume_centered=True).fit(residual).precision_
    scores = np.einsum("ij,jk,ik->i", residual, precision, residual)
    return Detection(scores, scores > scores.mean() + 3 * scores.std())


# --- STRIP -----------------------------------------------------------------------------------
def superimpose(inputs: torch.Tensor, overlays: torch.Tensor) -> torch.Tensor:
    """N x C x H x W inputs, M overlays (pixel space) -> N*M blends (x_i + h_j) / 2, input-major."""
    return ((inputs[:, None] + overlays[None]) / 2).flatten(0, 1)


def entropy_bits(probabilities: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c log2 p_c along the last axis (0 log 0 = 0)."""
    p = probabilities.double()
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(dim=-1)


@torch.inference_mode()
def strip_entropy(model, inputs: torch.Tensor, overlays: torch.Tensor, normalize, device, batch_size: int = 256,
                  desc: str = "STRIP") -> np.ndarray:
    """Mean entropy (bits) of the softmax over each input's superimpositions with every overlay."""
    model.eval()
    per_chunk = max(1, batch_size // max(1, len(overlays)))
    overlays = overlays.to(device)
    out = []
    for start in progress(range(0, len(inputs), per_chunk), desc):
        chunk = inputs[start:start + per_chunk].to(device)
        logits = model(normalize(superimpose(chunk, overlays)))
        h = entropy_bits(F.softmax(logits.double(), dim=1)).view(len(chunk), len(overlays))
        out.append(h.mean(dim=1).cpu())
    return torch.cat(out).numpy()


def strip_threshold(clean_entropies: np.ndarray, frr: float = 0.01) -> float:
    """The entropy below which an input is flagged: the `frr` quantile of held-out clean entropies."""
    return float(np.quantile(np.asarray(clean_entropies, dtype=np.float64), frr))


# --- Neural Cleanse --------------------------------------------------------------------------
@dataclass
class Cleanse:
    classes: np.ndarray  # the classes reverse-engineered
    masks: np.ndarray  # K x H x W in [0, 1]
    patterns: np.ndarray  # K x C x H x W, pixel space
    norms: np.ndarray  # |m|_1 of each kept mask
    success: np.ndarray  # attack success of the kept mask on the batch it was kept at
    anomaly: np.ndarray  # anomaly index per class
    flagged: int | None  # the class NC flags, or None


def _to_logit(values: torch.Tensor) -> torch.Tensor:
    """Inverse of (tanh(a) + 1) / 2, for values kept away from 0 and 1."""
    return torch.atanh((values.clamp(0.01, 0.99) - 0.5) * 2)


def reverse_engineer(model, images: torch.Tensor, classes, normalize, device, steps: int = 100, batch_size: int = 32,
                     lr: float = 0.1, cost: float = 1e-3, patience: int = 5, seed: int = 0,
                     max_batch: int = 512, desc: str = "Neural Cleanse") -> Cleanse:
    """Neural Cleanse's smallest mask and pattern per class (module docstring), on clean `images` (pixel space).

    Classes are optimised together, several per forward pass: the losses add and Adam acts on each
    parameter alone, so this equals one optimisation per class.
    """
    model.eval()
    with frozen(model):
        return _reverse_engineer(model, images, classes, normalize, device, steps, batch_size, lr, cost, patience,
                                 seed, max_batch, desc)


@contextmanager
def frozen(model):
    """Weights without gradients for the duration (only the mask and pattern are optimised)."""
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in wanted:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in wanted:
            parameter.requires_grad_(flag)


def _reverse_engineer(model, images, classes, normalize, device, steps, batch_size, lr, cost, patience, seed,
                      max_batch, desc) -> Cleanse:
    classes = np.asarray(classes, dtype=np.int64)
    n, channels, h, w = images.shape
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(
        int(np.ceil(steps * min(batch_size, n) / n)) + 1)])
    batch = min(batch_size, n)
    group = max(1, max_batch // batch)
    masks, patterns, norms, success = [], [], [], []
    for start in range(0, len(classes), group):
        chunk = torch.as_tensor(classes[start:start + group], device=device)
        k = len(chunk)
        mask_logit = _to_logit(MASK_INIT * torch.rand(k, 1, h, w, generator=generator)).to(device).requires_grad_(True)
        pattern_logit = _to_logit(torch.rand(k, channels, h, w, generator=generator)).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
        lam = torch.full((k,), cost, device=device, dtype=torch.float64)
        best_norm = torch.full((k,), float("inf"), device=device, dtype=torch.float64)
        best_mask = torch.zeros(k, 1, h, w, device=device)
        best_pattern = torch.zeros(k, channels, h, w, device=device)
        best_success = torch.zeros(k, device=device, dtype=torch.float64)
        window = torch.zeros(k, device=device, dtype=torch.float64)
        for step in progress(range(steps), f"{desc}, classes {start + 1}-{start + k} of {len(classes)}"):
            x = images[order[step * batch:(step + 1) * batch]].to(device)
            mask = (torch.tanh(mask_logit) + 1) / 2
            pattern = (torch.tanh(pattern_logit) + 1) / 2
            stamped = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]  # k x b x C x H x W
            logits = model(normalize(stamped.flatten(0, 1))).view(k, len(x), -1)
            target = chunk[:, None].expand(k, len(x))
            ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(k, -1).mean(1)
            l1 = mask.flatten(1).sum(1)
            loss = (ce + lam.float() * l1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                hit = (logits.argmax(-1) == target).double().mean(1)
                better = (hit >= NC_SUCCESS) & (l1.double() < best_norm)
                best_norm = torch.where(better, l1.double(), best_norm)
                best_mask[better], best_pattern[better] = mask[better], pattern[better]
                best_success = torch.where(better, hit, best_success)
                window += hit >= NC_SUCCESS
                if (step + 1) % patience == 0:
                    lam = torch.where(window == patience, lam * 1.5, lam / 1.5 ** 1.5)
                    window.zero_()
        with torch.no_grad():
            # A class never reached 99% success: keep its last mask, so that its norm still counts.
            never = torch.isinf(best_norm)
            mask = (torch.tanh(mask_logit) + 1) / 2
            best_mask[never] = mask[never]
            best_pattern[never] = ((torch.tanh(pattern_logit) + 1) / 2)[never]
            best_norm = torch.where(never, mask.flatten(1).sum(1).double(), best_norm)
            best_success = torch.where(never, hit, best_success)
        masks.append(best_mask[:, 0].cpu()); patterns.append(best_pattern.cpu())
        norms.append(best_norm.cpu()); success.append(best_success.cpu())
    norms = torch.cat(norms).numpy()
    anomaly = anomaly_index(norms)
    return Cleanse(classes, torch.cat(masks).numpy(), torch.cat(patterns).numpy(), norms,
                   torch.cat(success).numpy(), anomaly, flagged_class(classes, norms, anomaly))


def anomaly_index(norms) -> np.ndarray:
    """|n_k - median| / (1.4826 MAD); 0 where all norms agree, inf for a norm off an otherwise zero MAD."""
    norms = np.asarray(norms, dtype=np.float64)
    deviation = np.abs(norms - np.median(norms))
    mad = MAD_SCALE * np.median(deviation)
    if mad == 0:
        return np.where(deviation > 0, np.inf, 0.0)
    return deviation / mad


def flagged_class(classes, norms, anomaly, threshold: float = ANOMALY_THRESHOLD) -> int | None:
    """The most anomalous class below the median norm with an index above `threshold`, else None."""
    norms, anomaly = np.asarray(norms), np.asarray(anomaly)
    candidates = np.flatnonzero((norms < np.median(norms)) & (anomaly > threshold))
    if len(candidates) == 0:
        return None
    return int(np.asarray(classes)[candidates[np.argmax(anomaly[candidates])]])


# --- scoring against the truth ---------------------------------------------------------------
def truth_of(groups) -> tuple[np.ndarray, np.ndarray]:
    """(kept: not a cross sample, positive: poisoned) from CLEAN / POISONED / CROSS groups."""
    groups = np.asarray(groups)
    return groups != CROSS, groups == POISONED


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> float:
    """The largest TPR among the thresholds whose FPR does not exceed `limit`."""
    return float(np.max(np.asarray(tpr)[np.asarray(fpr) <= limit + 1e-12]))


def evaluate(scores, groups, flags) -> dict:
    """AUROC, AP, TPR at 1% and 5% FPR, the rule's TPR and FPR, and the ROC curve, on poisoned vs clean.

    The ranking numbers are None when one of the two groups is empty.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, flags = np.asarray(scores, dtype=np.float64), np.asarray(flags, dtype=bool)
    kept, positive = truth_of(groups)
    s, y, f = scores[kept], positive[kept], flags[kept]
    out = {"poisoned": int(y.sum()), "clean": int((~y).sum()), "cross": int((~kept).sum()),
           "auroc": None, "ap": None, "tpr_at_1fpr": None, "tpr_at_5fpr": None,
           "rule_tpr": float(f[y].mean()) if y.any() else None,
           "rule_fpr": float(f[~y].mean()) if (~y).any() else None,
           "roc_fpr": np.array([]), "roc_tpr": np.array([]), "roc_thresholds": np.array([])}
    if y.any() and (~y).any():
        fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
        out.update(auroc=float(roc_auc_score(y, s)), ap=float(average_precision_score(y, s)),
                   tpr_at_1fpr=tpr_at_fpr(fpr, tpr, 0.01), tpr_at_5fpr=tpr_at_fpr(fpr, tpr, 0.05),
                   roc_fpr=fpr, roc_tpr=tpr, roc_thresholds=thresholds)
    return out

