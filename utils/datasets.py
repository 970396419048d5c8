"""Readers of the clean datasets in their standard on-disk layouts. Nothing is ever downloaded.

Each reader returns a `CleanData`: integer labels for every sample (read once, cheaply) and an
`image(i)` that decodes one sample as uint8 H x W x C. Sample order is the dataset's canonical
order, which is what BackdoorBench's original indices refer to.
"""
import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    size: tuple  # (H, W, C)
    mean: tuple
    std: tuple
    folder_names: tuple = ()  # sub-folders the standard layout may sit in


DATASETS = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (0.5,), (0.5,), ("MNIST/raw", "raw", "MNIST")),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261),
                           ("cifar-10-batches-py",)),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            ("cifar-100-python",)),
    "gtsrb": DatasetInfo("gtsrb", 43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ("GTSRB", "gtsrb")),
    "celeba": DatasetInfo("celeba", 8, (64, 64, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ("celeba",)),
    "tiny": DatasetInfo("tiny", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                        ("tiny-imagenet-200",)),
    # The demo's data: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 RGB.
    "digits": DatasetInfo("digits", 10, (32, 32, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

CELEBA_CLASS_NAMES = tuple(
    " ".join(name for name, bit in zip(("makeup", "smiling", "mouth open"), (4 & k, 2 & k, 1 & k)) if bit) or "none"
    for k in range(8)
)


def dataset_info(name: str) -> DatasetInfo:
    key = name.lower()
    if key not in DATASETS:
        raise UserError(f"dataset {name!r} is not supported; known datasets: {', '.join(DATASETS)}")
    return DATASETS[key]


@dataclass
class CleanData:
    """One split (train or test) of a clean dataset."""

    name: str
    labels: np.ndarray
    class_names: tuple
    _array: np.ndarray | None = None  # N x H x W x C uint8, for datasets that fit in memory
    _files: list = field(default_factory=list)  # per-sample image files, for folder datasets
    _size: tuple | None = None  # resize folder images to (W, H)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> np.ndarray:
        if self._array is not None:
            return self._array[index]
        with Image.open(self._files[index]) as img:
            img = img.convert("RGB")
            if self._size is not None and img.size != self._size:
                img = img.resize(self._size, Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)


def _find_root(root: Path, info: DatasetInfo, marker: str) -> Path:
    candidates = [root] + [root / sub for sub in info.folder_names]
    for candidate in candidates:
        if (candidate / marker).exists() or (candidate / (marker + ".gz")).exists():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(f"{info.name} data not found: looked for {marker} in {looked}; "
                    f"pass --dataset_path pointing at the dataset's folder")


def _unpickle(path: Path):
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="bytes")


def _read_cifar(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    if info.name == "cifar10":
        base = _find_root(root, info, "test_batch")
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
    else:
        base = _find_root(root, info, "test")
        files = ["train"] if train else ["test"]
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
    data, labels = [], []
    for name in files:
        if not (base / name).exists():
            raise UserError(f"{info.name} file {base / name} is missing; the folder is incomplete")
        batch = _unpickle(base / name)
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[label_key])
    array = np.concatenate(data).transpose(0, 2, 3, 1).copy()
    class_names = tuple(str(i) for i in range(info.num_classes))
    if (base / meta_file).exists():
        meta = _unpickle(base / meta_file)
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, class_names))
    return CleanData(info.name, np.asarray(labels, dtype=np.int64), class_names, _array=array)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_mnist(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    prefix = "train" if train else "t10k"
    base = _find_root(root, info, f"{prefix}-images-idx3-ubyte")

    def pick(name):
        plain = base / name
        return plain if plain.exists() else base / (name + ".gz")

    images = _read_idx(pick(f"{prefix}-images-idx3-ubyte"))[..., None].copy()
    labels = _read_idx(pick(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return CleanData(info.name, labels, tuple(str(i) for i in range(10)), _array=images)


def _read_gtsrb(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    size = (info.size[1], info.size[0])
    if train:
        base = _find_root(root, info, "Train")
        files, labels = [], []
        for class_dir in sorted(p for p in (base / "Train").iterdir() if p.is_dir()):
            for image in sorted(class_dir.glob("*.ppm")) + sorted(class_dir.glob("*.png")):
                files.append(image)
                labels.append(int(class_dir.name))
    else:
        base = _find_root(root, info, "Test")
        csv_path = next((p for p in (base / "Test" / "GT-final_test.csv", base / "GT-final_test.csv") if p.exists()), None)
        if csv_path is None:
            raise UserError(f"gtsrb test labels GT-final_test.csv not found under {base}; the folder is incomplete")
        files, labels = [], []
        for line in csv_path.read_text().splitlines()[1:]:
            parts = line.strip().split(";")
            if len(parts) >= 2:
                files.append(base / "Test" / parts[0])
                labels.append(int(parts[-1]))
    return CleanData(info.name, np.asarray(labels, dtype=np.int64), tuple(str(i) for i in range(43)),
                     _files=files, _size=size)


def _read_tiny(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    base = _find_root(root, info, "wnids.txt")
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").exists():
        for line in (base / "words.txt").read_text().splitlines():
            key, _, text = line.partition("\t")
            words[key] = text.split(",")[0].strip()
    files, labels = [], []
    if train:
        for wnid in wnids:
            for image in sorted((base / "train" / wnid / "images").glob("*.JPEG")):
                files.append(image)
                labels.append(index[wnid])
    else:
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.exists():
            raise UserError(f"tiny-imagenet {annotations} is missing; the folder is incomplete")
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                files.append(base / "val" / "images" / parts[0])
                labels.append(index[parts[1]])
    names = tuple(words.get(w, w) for w in wnids)
    return CleanData(info.name, np.asarray(labels, dtype=np.int64), names, _files=files,
                     _size=(info.size[1], info.size[0]))


def _read_celeba(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    base = _find_root(root, info, "list_attr_celeba.txt")
    lines = (base / "list_attr_celeba.txt").read_text().splitlines()
    header = lines[1].split()
    wanted = [header.index(a) for a in ("Heavy_Makeup", "Smiling", "Mouth_Slightly_Open")]
    attrs = {}
    for line in lines[2:]:
        parts = line.split()
        if parts:
            bits = [int(parts[1 + k]) > 0 for k in wanted]
            attrs[parts[0]] = 4 * bits[0] + 2 * bits[1] + bits[2]
    partition = {}
    for line in (base / "list_eval_partition.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            partition[parts[0]] = int(parts[1])
    wanted_split = 0 if train else 2
    names = sorted(n for n, p in partition.items() if p == wanted_split)
    folder = base / "img_align_celeba"
    return CleanData(info.name, np.asarray([attrs[n] for n in names], dtype=np.int64), CELEBA_CLASS_NAMES,
                     _files=[folder / n for n in names], _size=(info.size[1], info.size[0]))


def load_digits_split(train: bool) -> CleanData:
    """scikit-learn's digits (shipped inside the package): 80/20 stratified split, 32x32 RGB."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    positions = np.arange(len(digits.target))
    train_pos, test_pos = train_test_split(positions, test_size=0.2, random_state=0, stratify=digits.target)
    chosen = np.sort(train_pos if train else test_pos)
    small = (digits.images[chosen] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR)) for img in small])
    rgb = np.repeat(big[..., None], 3, axis=3)
    return CleanData("digits", digits.target[chosen].astype(np.int64), tuple(str(i) for i in range(10)), _array=rgb)


_READERS = {"cifar10": _read_cifar, "cifar100": _read_cifar, "mnist": _read_mnist, "gtsrb": _read_gtsrb,
            "tiny": _read_tiny, "celeba": _read_celeba}
_CACHE: dict = {}


def open_clean_dataset(name: str, root: Path | None, train: bool) -> CleanData:
    info = dataset_info(name)
    key = (info.name, str(root), train)
    if key in _CACHE:
        return _CACHE[key]
    if info.name == "digits":
        data = load_digits_split(train)
    else:
        if root is None or not Path(root).exists():
            raise UserError(f"{info.name} data folder {root} not found; pass --dataset_path pointing at it")
        data = _READERS[info.name](Path(root), info, train)
    if len(data) == 0:
        raise UserError(f"{info.name} {'train' if train else 'test'} split under {root} holds no samples")
    _CACHE[key] = data
    return data
