"""Predictions over a split and BackdoorBench's metrics (fractions, not percentages)."""
from dataclasses import dataclass

import numpy as np
import torch

from backdoor_lens.device import progress
from backdoor_lens.stats.activations import shared_outputs


@dataclass
class Predictions:
    pred: np.ndarray
    labels: np.ndarray  # served labels
    original_labels: np.ndarray
    poison: np.ndarray
    indices: np.ndarray
    confidence: np.ndarray  # softmax probability of the predicted class


@torch.inference_mode()
def predict(model: torch.nn.Module, loader, device, desc: str = "predict") -> Predictions:
    """One pass over a loader; the model is evaluated in eval mode. Under `backdoor-lens all` the
    logits come from the split's shared pass (stats.activations.split_pass), batch by batch as
    this loop would compute them."""
    model.eval()
    shared = shared_outputs(model, loader, device, desc)
    if shared is not None:
        batches = ((logits, *rest) for logits, rest in zip(shared.logits, shared.rest))
    else:
        batches = ((model(x.to(device, non_blocking=True)), y, y0, p, idx) for x, y, y0, p, idx in progress(loader, desc))
    preds, confs, labels, originals, poisons, indices = [], [], [], [], [], []
    for logits, y, y0, p, idx in batches:
        probs = torch.softmax(logits.float(), dim=1)
        conf, pred = probs.max(dim=1)
        preds.append(pred.cpu()); confs.append(conf.cpu())
        labels.append(y); originals.append(y0); poisons.append(p); indices.append(idx)
    cat = lambda parts: torch.cat(parts).numpy() if parts else np.zeros(0)  # noqa: E731
    return Predictions(cat(preds).astype(np.int64), cat(labels).astype(np.int64), cat(originals).astype(np.int64),
                       cat(poisons).astype(bool), cat(indices).astype(np.int64), cat(confs))


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean()) if len(labels) else float("nan")


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true (served) label; columns: prediction."""
    return np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def der(asr_attack, acc_attack, asr_defense, acc_defense) -> float:
    """Defense effectiveness rate: [max(0, ASR_a - ASR_d) - max(0, ACC_a - ACC_d) + 1] / 2."""
    return (max(0.0, asr_attack - asr_defense) - max(0.0, acc_attack - acc_defense) + 1) / 2


def rir(ra_attack, acc_attack, ra_defense, acc_defense) -> float:
    """Robust improvement rate: [max(0, RA_d - RA_a) - max(0, ACC_a - ACC_d) + 1] / 2."""
    return (max(0.0, ra_defense - ra_attack) - max(0.0, acc_attack - acc_defense) + 1) / 2


def model_metrics(model: torch.nn.Module, clean_loader, bd_loader, device) -> dict:
    """clean_accuracy (on clean_test), asr (bd_test predictions against the attack labels) and ra
    (against the original labels) of one model; asr and ra are NaN without poisoned test samples."""
    clean = predict(model, clean_loader, device, desc="clean_test")
    result = {"clean_accuracy": accuracy(clean.pred, clean.labels), "asr": float("nan"), "ra": float("nan")}
    if bd_loader is not None:
        bd = predict(model, bd_loader, device, desc="bd_test")
        result["asr"] = accuracy(bd.pred, bd.labels)
        result["ra"] = accuracy(bd.pred, bd.original_labels)
    return result
