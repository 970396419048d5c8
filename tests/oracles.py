"""Independent computations the tests compare the package against (never the package itself).

The direct side reads the state_dict straight from attack_result.pt, the clean images from the
CIFAR pickles and the poisoned ones from the record's PNGs, normalises by hand and forwards plain
batches with its own forward hooks.
"""
import pickle

import numpy as np
import torch
from PIL import Image

from backdoor_lens.models import PreActResNet18
from tests.bb_fixture import load_raw

MEAN = np.array([0.4914, 0.4822, 0.4465])
STD = np.array([0.247, 0.243, 0.261])
LAST = "layer4.1.conv2"


def hand_model(bb):
    raw = load_raw(bb.record_dir / "attack_result.pt")
    model = PreActResNet18(10)
    model.load_state_dict(raw["model"])
    return model.eval()


def cifar(bb, train: bool):
    images, labels = [], []
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    for name in names:
        with open(bb.data_dir / "cifar-10-batches-py" / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[b"labels"])
    return np.concatenate(images), np.array(labels)


def png(bb, which: str, label: int, index: int) -> np.ndarray:
    return np.asarray(Image.open(bb.record_dir / f"{which}_dataset" / str(label) / f"{index}.png").convert("RGB"))


DIRECT_LAYERS = ("conv1", "layer1.0.conv1", "layer2.0.bn1", LAST, "linear")


def outputs(model, images: np.ndarray, layers) -> dict:
    """{layer: N x C x P} for uint8 images N x H x W x 3, via our own hooks."""
    got = {}
    handles = [dict(model.named_modules())[name].register_forward_hook(
        lambda m, i, o, name=name: got.__setitem__(name, o.detach().clone())) for name in layers]
    x = torch.tensor(((images / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return {name: got[name].reshape(got[name].shape[0], got[name].shape[1], -1).double().numpy() for name in layers}


_CACHE = {}


def direct_pairs(bb, which="bd_train") -> dict:
    """Per layer of DIRECT_LAYERS: (poisoned N x C x P, clean twins N x C x P) over the record's poisoned samples."""
    key = (str(bb.record_dir), "pairs", which)
    if key not in _CACHE:
        model = hand_model(bb)
        images, labels = cifar(bb, train=which == "bd_train")
        poisoned = bb.train_poison if which == "bd_train" else bb.test_poison
        p = outputs(model, np.stack([png(bb, which, labels[i], i) for i in poisoned]), DIRECT_LAYERS)
        c = outputs(model, images[poisoned], DIRECT_LAYERS)
        _CACHE[key] = {name: (p[name], c[name]) for name in DIRECT_LAYERS}
    return _CACHE[key]


def direct_tac(pair) -> np.ndarray:
    poisoned, clean = pair
    return np.abs(poisoned - clean).mean(axis=(0, 2))


def served_train_scores(bb, layer: str) -> tuple:
    """Channel means (N x C) of every bd_train sample as served (PNG for the poisoned)."""
    key = (str(bb.record_dir), "served")
    images, labels = cifar(bb, train=True)
    if key not in _CACHE:
        served_images = np.stack([png(bb, "bd_train", labels[i], i) if i in bb.train_poison else images[i]
                                  for i in range(len(labels))])
        _CACHE[key] = {name: out.mean(2) for name, out in outputs(hand_model(bb), served_images, DIRECT_LAYERS).items()}
    served = labels.copy()
    served[bb.train_poison] = bb.target
    return _CACHE[key][layer], labels, served
