"""Miniature BackdoorBench records and datasets for the tests, written in the real on-disk layouts.

`make_bb_root(tmp, kind=...)` lays out a BackdoorBench checkout in miniature:
    <root>/data/<dataset>/...            the clean dataset in its standard layout
    <root>/record/<name>/attack_result.pt, bd_train_dataset/<label>/<index>.png, ...
The model is a PreAct-ResNet-18 (or the requested zoo model) with seeded random weights, or a
state_dict passed in. Images are class-coloured noise so that a model can learn them quickly.
"""
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from demo.bb_record import write_attack_record
from demo.triggers import badnets_patch
from utils.models import build_model

def load_raw(path) -> dict:
    """A record file as written, read the safe way the tests can trust: weights_only with the numpy
    array globals allowed (independent of utils.safe_load, which the tests check)."""
    from numpy._core.multiarray import _reconstruct, scalar

    allowed = [_reconstruct, scalar, np.ndarray, np.dtype, np.dtypes.Int64DType, np.dtypes.Float64DType]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class BBRecord:
    root: Path  # the BackdoorBench checkout in miniature
    record_dir: Path
    data_dir: Path
    dataset: str
    n_train: int
    n_test: int
    target: int | None
    train_poison: list
    test_poison: list


def class_images(labels: np.ndarray, size, channels: int, seed: int) -> np.ndarray:
    """uint8 images whose mean colour and stripe direction depend on the class."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((len(labels), h, w, channels), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for i, label in enumerate(labels):
        base = 40 + (int(label) * 37) % 160
        stripes = 40 * np.sin((xx if label % 2 else yy) * (0.5 + 0.1 * (label % 5)))
        img = base + stripes[..., None] + rng.normal(0, 12, size=(h, w, channels))
        out[i] = img.clip(0, 255)
    return out


def write_cifar10(folder: Path, train_images, train_labels, test_images, test_labels):
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for k, chunk in enumerate(chunks, start=1):
        data = train_images[chunk].transpose(0, 3, 1, 2).reshape(len(chunk), -1)
        with open(base / f"data_batch_{k}", "wb") as handle:
            pickle.dump({b"data": data, b"labels": [int(v) for v in train_labels[chunk]]}, handle)
    with open(base / "test_batch", "wb") as handle:
        pickle.dump({b"data": test_images.transpose(0, 3, 1, 2).reshape(len(test_labels), -1),
                     b"labels": [int(v) for v in test_labels]}, handle)
    with open(base / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES]}, handle)


def write_mnist(folder: Path, train_images, train_labels, test_images, test_labels):
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    def idx(path, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())

    idx(raw / "train-images-idx3-ubyte", train_images[..., 0])
    idx(raw / "train-labels-idx1-ubyte", train_labels.astype(np.uint8))
    idx(raw / "t10k-images-idx3-ubyte", test_images[..., 0])
    idx(raw / "t10k-labels-idx1-ubyte", test_labels.astype(np.uint8))


def write_tiny(folder: Path, train_images, train_labels, test_images, test_labels, num_classes: int):
    from PIL import Image

    base = folder / "tiny-imagenet-200"
    wnids = [f"n{k:08d}" for k in range(num_classes)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {k}, other" for k, w in enumerate(wnids)) + "\n")
    counters = {}
    for image, label in zip(train_images, train_labels):
        k = counters.get(label, 0)
        counters[label] = k + 1
        path = base / "train" / wnids[label] / "images" / f"{wnids[label]}_{k}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="PNG")  # content type does not matter to PIL
    lines = []
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(test_images, test_labels)):
        Image.fromarray(image).save(base / "val" / "images" / f"val_{i}.JPEG", format="PNG")
        lines.append(f"val_{i}.JPEG\t{wnids[label]}\t0\t0\t8\t8")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


DATASET_SHAPES = {"cifar10": ((32, 32), 3, 10), "mnist": ((28, 28), 1, 10), "tiny": ((64, 64), 3, 200)}


def make_bb_root(tmp: Path, name: str = "badnet_mini", dataset: str = "cifar10", model_name: str = "preactresnet18",
                 n_train: int = 60, n_test: int = 40, pratio: float = 0.1, target: int = 0, with_bd_train=True,
                 with_bd_test=True, state_dict=None, seed: int = 0, num_classes: int | None = None) -> BBRecord:
    size, channels, classes = DATASET_SHAPES[dataset]
    classes = num_classes or classes
    rng = np.random.default_rng(seed)
    root = Path(tmp)
    train_labels = np.arange(n_train) % classes
    test_labels = np.arange(n_test) % classes
    rng.shuffle(train_labels)
    train_images = class_images(train_labels, size, channels, seed)
    test_images = class_images(test_labels, size, channels, seed + 1)
    data_dir = root / "data" / dataset
    if dataset == "cifar10":
        write_cifar10(data_dir, train_images, train_labels, test_images, test_labels)
    elif dataset == "mnist":
        write_mnist(data_dir, train_images, train_labels, test_images, test_labels)
    else:
        write_tiny(data_dir, train_images, train_labels, test_images, test_labels, classes)
    candidates = np.flatnonzero(train_labels != target)
    train_poison = sorted(rng.choice(candidates, size=max(1, int(round(pratio * n_train))), replace=False).tolist())
    test_poison = np.flatnonzero(test_labels != target).tolist()
    if state_dict is None:
        torch.manual_seed(seed)
        state_dict = build_model(model_name, classes, channels if model_name == "preactresnet18" else 3).state_dict()
    record_dir = root / "record" / name
    write_attack_record(
        record_dir, model_name=model_name, num_classes=classes, state_dict=state_dict, dataset=dataset,
        img_size=(size[0], size[1], channels),
        train_poison={i: (badnets_patch(train_images[i][None])[0], target, int(train_labels[i])) for i in train_poison}
        if with_bd_train else None, n_train=n_train,
        test_poison={i: (badnets_patch(test_images[i][None])[0], target, int(test_labels[i])) for i in test_poison}
        if with_bd_test else None, n_test=n_test)
    return BBRecord(root, record_dir, data_dir, dataset, n_train, n_test, target,
                    train_poison if with_bd_train else [], test_poison if with_bd_test else [])


# --- the record kinds users bring (issue: every kind of record through every script) ----------

RECORD_KINDS = ("attack", "defense_pruned", "defense_clp", "prototype", "no_bd_train", "mnist", "tiny200")


def write_defense(folder: Path, state_dict: dict, model_name: str = "preactresnet18", num_classes: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_name": model_name, "num_classes": num_classes, "model": state_dict}, folder / "defense_result.pt")
    return folder


def pruned_state_dict(state_dict: dict, seed: int = 1) -> dict:
    """What fine-pruning leaves: torch.nn.utils.prune's weight_orig + weight_mask on the last layers."""
    generator = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in state_dict.items()}
    for name in ("layer4.1.conv2", "linear"):
        weight = sd.pop(f"{name}.weight")
        mask = torch.ones_like(weight)
        channels = torch.randperm(weight.shape[0], generator=generator)[: weight.shape[0] // 4]
        mask[channels] = 0
        sd[f"{name}.weight_orig"] = weight
        sd[f"{name}.weight_mask"] = mask
    return sd


def clp_state_dict(state_dict: dict) -> dict:
    """What CLP leaves: a plain state_dict with some convolution output channels zeroed."""
    sd = {k: v.clone() for k, v in state_dict.items()}
    for name in ("layer3.1.conv2.weight", "layer4.1.conv2.weight"):
        sd[name][: max(1, sd[name].shape[0] // 16)] = 0
    return sd


def write_prototype(root: Path, name: str, state_dict: dict, dataset: str, size, channels: int, classes: int) -> Path:
    """BackdoorBench's attack/prototype.py: clean_model.pth (a state_dict) and info.pickle (torch.save of args)."""
    folder = root / "record" / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "clean_model.pth")
    torch.save({"model": "preactresnet18", "dataset": dataset, "num_classes": classes, "input_height": size[0],
                "input_width": size[1], "input_channel": channels, "dataset_path": f"./data/{dataset}"},
               folder / "info.pickle")
    return folder


def make_record_kind(tmp: Path, kind: str, n_train: int = 40, n_test: int = 30) -> list:
    """Build one record kind under tmp; returns the command-line flags that point a script at it."""
    tmp = Path(tmp)
    if kind in ("attack", "defense_pruned", "defense_clp", "no_bd_train", "prototype"):
        bb = make_bb_root(tmp, n_train=n_train, n_test=n_test, with_bd_train=kind != "no_bd_train")
    elif kind == "mnist":
        bb = make_bb_root(tmp, dataset="mnist", n_train=n_train, n_test=n_test)
    elif kind == "tiny200":
        bb = make_bb_root(tmp, dataset="tiny", n_train=max(n_train, 200), n_test=max(n_test, 200) // 2)
    else:
        raise ValueError(kind)
    flags = ["--result_file_attack", str(bb.record_dir), "--dataset_path", str(bb.data_dir)]
    state_dict = load_raw(bb.record_dir / "attack_result.pt")["model"]
    if kind == "defense_pruned":
        folder = write_defense(bb.record_dir / "defense" / "fp", pruned_state_dict(state_dict))
        flags += ["--result_file_defense", str(folder)]
    elif kind == "defense_clp":
        folder = write_defense(bb.record_dir / "defense" / "clp", clp_state_dict(state_dict))
        flags += ["--result_file_defense", str(folder / "defense_result.pt")]
    elif kind == "prototype":
        folder = write_prototype(tmp, "prototype_mini", state_dict, "cifar10", (32, 32), 3, 10)
        flags = ["--result_file_attack", str(folder), "--dataset_path", str(bb.data_dir)]
    return flags
