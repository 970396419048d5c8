"""Miniature BackdoorBench records and datasets for the tests, written in the real on-disk layouts.

`make_bb_root(tmp, kind=...)` lays out a BackdoorBench checkout in miniature:
    <root>/data/<dataset>/...            the clean dataset in its standard layout
    <root>/record/<name>/attack_result.pt, bd_train_dataset/<label>/<index>.png, ...
The model is a PreAct-ResNet-18 (or the requested zoo model) with seeded random weights, or a
state_dict passed in. Images are class-coloured noise so that a model can learn them quickly.
"""
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from demo.bb_record import write_attack_record
from demo.triggers import badnets_patch
from backdoor_lens.models import build_model

def load_raw(path) -> dict:
    """A record file as written, read the safe way the tests can trust: weights_only with the numpy
    array globals allowed (independent of backdoor_lens.record.safe_load, which the tests check)."""
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


class Python2Pickler(pickle._Pickler):
    """Writes every str and bytes as Python 2's `str` (BINSTRING), as the official CIFAR files hold
    them (cPickle, protocol 2), and names numpy 1's `numpy.core.multiarray`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        if module == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


CIFAR_KEY_KINDS = ("bytes", "str", "python2")


def dump_cifar_pickle(path: Path, content: dict, keys: str):
    """keys: "bytes" (Python 3 writer, bytes keys), "str" (Python 3 writer, str keys) or "python2"
    (the official files: Python 2 strings, read back as bytes or, with latin1, as str)."""
    if keys == "python2":
        with open(path, "wb") as handle:
            Python2Pickler(handle, protocol=2).dump(content)
        return
    if keys == "bytes":
        content = {k.encode(): [n.encode() for n in v] if k.endswith("names") else v for k, v in content.items()}
    with open(path, "wb") as handle:
        pickle.dump(content, handle)


def _cifar_rows(images) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def write_cifar10(folder: Path, train_images, train_labels, test_images, test_labels, keys: str = "bytes"):
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for k, chunk in enumerate(chunks, start=1):
        dump_cifar_pickle(base / f"data_batch_{k}", {"batch_label": f"training batch {k} of 5",
                                                    "data": _cifar_rows(train_images[chunk]),
                                                    "labels": [int(v) for v in train_labels[chunk]]}, keys)
    dump_cifar_pickle(base / "test_batch", {"batch_label": "testing batch 1 of 1", "data": _cifar_rows(test_images),
                                            "labels": [int(v) for v in test_labels]}, keys)
    dump_cifar_pickle(base / "batches.meta", {"label_names": list(CIFAR_NAMES), "num_vis": 3072}, keys)


CIFAR100_NAMES = [f"fine{k}" for k in range(100)]


def write_cifar100(folder: Path, train_images, train_labels, test_images, test_labels, keys: str = "bytes"):
    base = folder / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        dump_cifar_pickle(base / name, {"data": _cifar_rows(images), "fine_labels": [int(v) for v in labels],
                                        "coarse_labels": [int(v) // 5 for v in labels]}, keys)
    dump_cifar_pickle(base / "meta", {"fine_label_names": list(CIFAR100_NAMES),
                                      "coarse_label_names": [f"coarse{k}" for k in range(20)]}, keys)


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format of MNIST: magic (0, 0, 8 = uint8, ndim), big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


MNIST_LAYOUTS = ("raw", "gz", "processed")


def write_mnist(folder: Path, train_images, train_labels, test_images, test_labels, layout: str = "raw"):
    """torchvision's layouts: MNIST/raw/ as plain idx files ("raw") or as the downloaded .gz files
    ("gz"), or the legacy MNIST/processed/{training,test}.pt of torch tensors ("processed")."""
    if layout == "processed":
        processed = folder / "MNIST" / "processed"
        processed.mkdir(parents=True, exist_ok=True)
        for name, images, labels in (("training.pt", train_images, train_labels),
                                     ("test.pt", test_images, test_labels)):
            torch.save((torch.from_numpy(images[..., 0].copy()), torch.from_numpy(np.asarray(labels, np.int64))),
                       processed / name)
        return
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte": train_images[..., 0], "train-labels-idx1-ubyte": train_labels,
             "t10k-images-idx3-ubyte": test_images[..., 0], "t10k-labels-idx1-ubyte": test_labels}
    for name, array in files.items():
        content = idx_bytes(np.asarray(array))
        if layout == "gz":
            (raw / (name + ".gz")).write_bytes(gzip.compress(content))
        else:
            (raw / name).write_bytes(content)


GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def write_gtsrb(folder: Path, train_images, train_labels, test_images, test_labels, layout: str = "backdoorbench"):
    """layout "backdoorbench" (sh/gtsrb_download.sh): Train/00000/GT-00000.csv + *.ppm per class,
    Test/*.ppm + Test/GT-final_test.csv; layout "folders": Train/<class>/*.png, no per-class csv."""
    from PIL import Image

    train = folder / "Train"
    counters = {}
    for image, label in zip(train_images, train_labels):
        label = int(label)
        k = counters.get(label, 0)
        counters[label] = k + 1
        if layout == "folders":
            path = train / str(label) / f"{k:05d}.png"
        else:
            path = train / f"{label:05d}" / f"{label:05d}_{k:05d}.ppm"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    if layout != "folders":
        for label, count in counters.items():
            rows = [f"{label:05d}_{k:05d}.ppm;32;32;0;0;31;31;{label}" for k in range(count)]
            (train / f"{label:05d}" / f"GT-{label:05d}.csv").write_text("\n".join([GTSRB_HEADER] + rows) + "\n")
    test = folder / "Test"
    test.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(test_images, test_labels)):
        Image.fromarray(image).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;32;32;0;0;31;31;{int(label)}")
    (test / "GT-final_test.csv").write_text("\n".join([GTSRB_HEADER] + rows) + "\n")


CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                     "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                     "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                     "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                     "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
                     "Young").split()


def write_celeba(folder: Path, train_images, train_labels, test_images, test_labels, seed: int = 0):
    """torchvision's CelebA layout under celeba/: list_attr_celeba.txt (40 attributes, +-1),
    list_eval_partition.txt (0 train, 1 valid, 2 test) and img_align_celeba/. A label k is
    BackdoorBench's 4 * Heavy_Makeup + 2 * Smiling + Mouth_Slightly_Open; the other attributes are
    random, and two validation images sit between the splits (they belong to neither)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = folder / "celeba"
    (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    valid = np.zeros((2,) + train_images.shape[1:], np.uint8)
    parts = [(train_images, train_labels, 0), (valid, np.zeros(2, np.int64), 1), (test_images, test_labels, 2)]
    attr_rows, partition_rows, n = [], [], 0
    for images, labels, split in parts:
        for image, label in zip(images, labels):
            n += 1
            name = f"{n:06d}.jpg"
            Image.fromarray(image).save(base / "img_align_celeba" / name, format="PNG")  # lossless; PIL reads content
            values = rng.choice([-1, 1], size=len(CELEBA_ATTRIBUTES))
            for attribute, bit in zip(("Heavy_Makeup", "Smiling", "Mouth_Slightly_Open"), (4, 2, 1)):
                values[CELEBA_ATTRIBUTES.index(attribute)] = 1 if int(label) & bit else -1
            attr_rows.append(name + " " + " ".join(f"{v:2d}" for v in values))
            partition_rows.append(f"{name} {split}")
    (base / "list_attr_celeba.txt").write_text("\n".join([str(n), " ".join(CELEBA_ATTRIBUTES)] + attr_rows) + "\n")
    (base / "list_eval_partition.txt").write_text("\n".join(partition_rows) + "\n")


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


DATASET_SHAPES = {"cifar10": ((32, 32), 3, 10), "mnist": ((28, 28), 1, 10), "tiny": ((64, 64), 3, 200),
                  "cifar100": ((32, 32), 3, 100), "gtsrb": ((32, 32), 3, 43), "celeba": ((64, 64), 3, 8)}


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
    if dataset == "tiny":
        write_tiny(data_dir, train_images, train_labels, test_images, test_labels, classes)
    else:
        writers = {"cifar10": write_cifar10, "cifar100": write_cifar100, "mnist": write_mnist, "gtsrb": write_gtsrb,
                   "celeba": write_celeba}
        writers[dataset](data_dir, train_images, train_labels, test_images, test_labels)
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
