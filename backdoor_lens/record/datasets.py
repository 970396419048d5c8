"""Readers of the clean datasets in their standard on-disk layouts. Nothing is ever downloaded.

Each reader returns a `CleanData`: integer labels for every sample (read once, cheaply) and an
`image(i)` that decodes one sample as uint8 H x W x C. Sample order is the dataset's canonical
order, which is what BackdoorBench's original indices refer to.
"""
import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backdoor_lens.errors import UserError
from backdoor_lens.record.safe_load import restricted_unpickle, safe_torch_load


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
        path = self._files[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self._size is not None and img.size != self._size:
                    img = img.resize(self._size, Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError) as error:  # missing, truncated, or not an image (PIL raises OSError)
            raise UserError(f"{self.name} image {path} cannot be read ({_first_line(error)}); "
                            f"replace it with an intact copy") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:160]


def _find_root(root: Path, info: DatasetInfo, marker: str) -> Path:
    candidates = [root] + [root / sub for sub in info.folder_names]
    for candidate in candidates:
        if (candidate / marker).exists() or (candidate / (marker + ".gz")).exists():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(f"{info.name} data not found: looked for {marker} in {looked}; "
                    f"pass --dataset_path pointing at the dataset's folder")


def _text_lines(path: Path, what: str) -> list:
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; the dataset folder is incomplete")
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not a readable text file ({_first_line(error)}); "
                        f"replace it with the original file") from None


# --- CIFAR-10 / CIFAR-100: pickles of {data, labels | fine_labels} --------------------------------

def _cifar_entry(content: dict, key: str):
    """Official files (Python 2 strings, read as latin1) and Python 3 writers using str keys give str
    keys; Python 3 writers using bytes keys give bytes. torchvision reads both; so do we."""
    return content[key] if key in content else content.get(key.encode())


def _read_cifar_batch(path: Path, info: DatasetInfo, label_key: str) -> tuple:
    what = f"{info.name} file"
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; the dataset folder is incomplete")
    batch = restricted_unpickle(path, what)
    if not isinstance(batch, dict):
        raise UserError(f"{what} {path} holds a {type(batch).__name__}, not a CIFAR batch (a dict with 'data' "
                        f"and '{label_key}'); replace it with the original file")
    data, labels = _cifar_entry(batch, "data"), _cifar_entry(batch, label_key)
    for key, value in (("data", data), (label_key, labels)):
        if value is None:
            raise UserError(f"{what} {path} has no '{key}' entry; replace it with the original file")
    try:
        pixels, labels = np.asarray(data), np.asarray(labels)
    except (TypeError, ValueError) as error:
        raise UserError(f"{what} {path} holds data or labels that are not arrays ({_first_line(error)}); "
                        f"replace it with the original file") from None
    image_bytes = 3 * 32 * 32
    if not np.issubdtype(pixels.dtype, np.integer) or pixels.size % image_bytes:
        raise UserError(f"{what} {path} holds {pixels.size} {pixels.dtype} values, not whole 32x32x3 uint8 images "
                        f"({image_bytes} values each); replace it with the original file")
    count = pixels.size // image_bytes
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != count:
        raise UserError(f"{what} {path} holds {count} images but {labels.size} {labels.dtype} labels in "
                        f"'{label_key}'; replace it with the original file")
    if pixels.dtype != np.uint8 and count and (pixels.min() < 0 or pixels.max() > 255):
        raise UserError(f"{what} {path} holds pixel values outside 0..255; replace it with the original file")
    # torchvision's order: row-major C x H x W per image, then to H x W x C.
    images = pixels.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def _read_cifar(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    if info.name == "cifar10":
        base = _find_root(root, info, "test_batch")
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        base = _find_root(root, info, "test")
        files = ["train"] if train else ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    parts = [_read_cifar_batch(base / name, info, label_key) for name in files]
    array = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    class_names = tuple(str(i) for i in range(info.num_classes))
    meta_path = base / meta_file
    if meta_path.exists():
        meta = restricted_unpickle(meta_path, f"{info.name} file")
        if not isinstance(meta, dict):
            raise UserError(f"{info.name} file {meta_path} holds a {type(meta).__name__}, not the dict of class "
                            f"names; replace it with the original file")
        names = _cifar_entry(meta, names_key)
        if names is not None:
            class_names = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)
    return CleanData(info.name, labels, class_names, _array=array)


# --- MNIST: idx files, plain or .gz, in torchvision's MNIST/raw/ -----------------------------------

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """The idx format: bytes 0, 0, type (8 = uint8), ndim; ndim big-endian sizes; the data."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"mnist file {path} cannot be read ({_first_line(error)}); "
                        f"replace it with a complete copy") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise UserError(f"mnist file {path} is not an idx file of {ndim}-d uint8 data (it starts with "
                        f"{raw[:4].hex() or 'nothing'}); replace it with the original file")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) < header or len(raw) - header != expected:
        raise UserError(f"mnist file {path} holds {max(0, len(raw) - header)} bytes of data where its header "
                        f"announces {expected} {shape}; the file is truncated or damaged, replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_mnist_processed(path: Path, info: DatasetInfo) -> CleanData:
    """torchvision's legacy MNIST/processed/{training,test}.pt: torch.save of (uint8 N x 28 x 28, N labels)."""
    content = safe_torch_load(path, what="mnist file")
    if not (isinstance(content, (tuple, list)) and len(content) == 2 and all(torch.is_tensor(t) for t in content)
            and content[0].dtype == torch.uint8 and content[0].dim() == 3 and content[1].dim() == 1
            and len(content[0]) == len(content[1])):
        raise UserError(f"mnist file {path} is not torchvision's (images, labels) pair: uint8 N x H x W images and "
                        f"N labels; replace it with the original file")
    images, labels = content[0].numpy()[..., None].copy(), content[1].numpy().astype(np.int64)
    return CleanData(info.name, labels, tuple(str(i) for i in range(10)), _array=images)


def _read_mnist(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    prefix = "train" if train else "t10k"
    try:
        base = _find_root(root, info, f"{prefix}-images-idx3-ubyte")
    except UserError:
        processed = "training.pt" if train else "test.pt"
        legacy = next((f / processed for f in (root / "MNIST" / "processed", root / "processed")
                       if (f / processed).is_file()), None)
        if legacy is None:
            raise
        return _read_mnist_processed(legacy, info)

    def pick(name):
        plain = base / name
        return plain if plain.exists() else base / (name + ".gz")

    images_path, labels_path = pick(f"{prefix}-images-idx3-ubyte"), pick(f"{prefix}-labels-idx1-ubyte")
    if not labels_path.exists():
        raise UserError(f"mnist file {labels_path} is missing; the dataset folder is incomplete")
    images = _read_idx(images_path, 3)[..., None].copy()
    labels = _read_idx(labels_path, 1).astype(np.int64)
    if len(labels) != len(images):
        raise UserError(f"mnist files {labels_path} and {images_path} disagree: {len(labels)} labels for "
                        f"{len(images)} images; replace them with the original files")
    return CleanData(info.name, labels, tuple(str(i) for i in range(10)), _array=images)


# --- GTSRB: BackdoorBench's layout (sh/gtsrb_download.sh), its older one, and torchvision's --------

_GTSRB_TRAIN_FOLDERS = ("Train", "Train/Images", "GTSRB/Training", "Training", "GTSRB/Final_Training/Images",
                        "Final_Training/Images")
_GTSRB_TEST_CSVS = ("Test/GT-final_test.csv", "GT-final_test.csv", "GTSRB/GT-final_test.csv")
_GTSRB_TEST_FOLDERS = ("Test", "Test/Images", "GTSRB/Final_Test/Images", "Final_Test/Images")
_IMAGE_SUFFIXES = (".ppm", ".png", ".jpg", ".jpeg")


def _gtsrb_csv(path: Path) -> list:
    """(file name, class) per row of a GTSRB annotation file, by the header's column names."""
    lines = [line for line in _text_lines(path, "gtsrb file") if line.strip()]
    header = lines[0].strip().split(";") if lines else []
    for column in ("Filename", "ClassId"):
        if column not in header:
            raise UserError(f"gtsrb file {path} has no {column} column (its header reads {';'.join(header)!r}); "
                            f"use the annotation file with class ids (GT-final_test.csv from GTSRB_Final_Test_GT.zip)")
    name_at, class_at = header.index("Filename"), header.index("ClassId")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.strip().split(";")
        if len(parts) != len(header) or not parts[class_at].strip().isdigit():
            raise UserError(f"gtsrb file {path} line {number} does not fit its header ({len(parts)} fields, "
                            f"expected {len(header)} with an integer ClassId); replace it with the original file")
        rows.append((parts[name_at].strip(), int(parts[class_at])))
    return rows


def _class_folders(folder: Path) -> list:
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _read_gtsrb(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    """BackdoorBench enumerates class 0, 1, ..., 42 in turn (numerically), each in the order of its
    GT-<class>.csv; without the csv, the class folder's images in name order, as torchvision does."""
    bases = [root] + [root / sub for sub in info.folder_names]
    files, labels = [], []
    if train:
        folders = [b / sub for b in bases for sub in _GTSRB_TRAIN_FOLDERS if (b / sub).is_dir()]
        folder = next((f for f in folders if _class_folders(f)), None)
        if folder is None:
            raise UserError(f"gtsrb training data not found: looked for class folders (00000, 00001, ...) under "
                            f"Train/ in {', '.join(str(b) for b in bases)}; pass --dataset_path pointing at it")
        for class_dir in _class_folders(folder):
            annotations = sorted(class_dir.glob("GT-*.csv"))
            if annotations:
                for name, label in _gtsrb_csv(annotations[0]):
                    files.append(class_dir / name)
                    labels.append(label)
            else:
                images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
                files += images
                labels += [int(class_dir.name)] * len(images)
    else:
        csv_path = next((b / sub for b in bases for sub in _GTSRB_TEST_CSVS if (b / sub).is_file()), None)
        if csv_path is None:
            raise UserError(f"gtsrb test labels not found: looked for Test/GT-final_test.csv in "
                            f"{', '.join(str(b) for b in bases)}; pass --dataset_path pointing at the dataset")
        rows = _gtsrb_csv(csv_path)
        # The images sit beside the csv (BackdoorBench), in Images/ below it (older BackdoorBench) or
        # in Final_Test/Images/ (torchvision): take the folder that holds the first listed image.
        candidates = [csv_path.parent, csv_path.parent / "Images"] + [b / sub for b in bases
                                                                        for sub in _GTSRB_TEST_FOLDERS]
        folder = next((c for c in candidates if rows and (c / rows[0][0]).is_file()), csv_path.parent)
        files = [folder / name for name, _ in rows]
        labels = [label for _, label in rows]
    return CleanData(info.name, np.asarray(labels, dtype=np.int64), tuple(str(i) for i in range(43)),
                     _files=files, _size=(info.size[1], info.size[0]))


# --- Tiny-ImageNet: BackdoorBench's Tiny reader ---------------------------------------------------

def _numbered_images(folder: Path, wnid: str) -> list:
    """<wnid>_0.JPEG, <wnid>_1.JPEG, ... in number order, as BackdoorBench lists them."""
    pattern = re.compile(re.escape(wnid) + r"_(\d+)\.JPEG$")
    numbered = [(int(m.group(1)), p) for p in folder.glob("*.JPEG") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(numbered)]


def _read_tiny(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    base = _find_root(root, info, "wnids.txt")
    wnids = [line.split()[0] for line in _text_lines(base / "wnids.txt", "tiny-imagenet file") if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").exists():
        for line in _text_lines(base / "words.txt", "tiny-imagenet file"):
            key, _, text = line.partition("\t")
            words[key] = text.split(",")[0].strip()
    files, labels = [], []
    if train:
        for wnid in wnids:
            images = _numbered_images(base / "train" / wnid / "images", wnid)
            files += images
            labels += [index[wnid]] * len(images)
    else:
        annotations = base / "val" / "val_annotations.txt"
        for number, line in enumerate(_text_lines(annotations, "tiny-imagenet file"), start=1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise UserError(f"tiny-imagenet file {annotations} line {number} names no class listed in "
                                f"{base / 'wnids.txt'} ({line.strip()[:60]!r}); replace it with the original file")
            files.append(base / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    names = tuple(words.get(w, w) for w in wnids)
    return CleanData(info.name, np.asarray(labels, dtype=np.int64), names, _files=files,
                     _size=(info.size[1], info.size[0]))


# --- CelebA: torchvision's layout; BackdoorBench's 8 classes from three attributes ----------------

CELEBA_LABEL_ATTRIBUTES = ("Heavy_Makeup", "Smiling", "Mouth_Slightly_Open")  # bits 4, 2, 1 of the label


def _read_celeba(root: Path, info: DatasetInfo, train: bool) -> CleanData:
    """torchvision's CelebA split (list_eval_partition.txt: 0 train, 2 test) in file order, labelled
    4 * Heavy_Makeup + 2 * Smiling + Mouth_Slightly_Open (attributes 18, 31 and 21)."""
    base = _find_root(root, info, "list_attr_celeba.txt")
    attr_path, partition_path = base / "list_attr_celeba.txt", base / "list_eval_partition.txt"
    lines = _text_lines(attr_path, "celeba file")
    header = lines[1].split() if len(lines) > 1 else []
    missing = [a for a in CELEBA_LABEL_ATTRIBUTES if a not in header]
    if missing:
        raise UserError(f"celeba file {attr_path} has no {', '.join(missing)} column; "
                        f"replace it with the original list_attr_celeba.txt")
    columns = [1 + header.index(a) for a in CELEBA_LABEL_ATTRIBUTES]
    attrs = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != len(header) + 1:
                raise ValueError(f"{len(parts) - 1} values for {len(header)} attributes")
            bits = [int(parts[k]) > 0 for k in columns]
        except ValueError as error:
            raise UserError(f"celeba file {attr_path} line {number} is malformed ({error}); "
                            f"replace it with the original file") from None
        attrs[parts[0]] = 4 * bits[0] + 2 * bits[1] + bits[2]
    wanted = "0" if train else "2"
    names = []
    for number, line in enumerate(_text_lines(partition_path, "celeba file"), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"celeba file {partition_path} line {number} is not '<image> <0|1|2>'; "
                            f"replace it with the original file")
        if parts[1] == wanted:
            names.append(parts[0])
    unlabelled = [n for n in names if n not in attrs]
    if unlabelled:
        raise UserError(f"celeba file {partition_path} lists {unlabelled[0]}"
                        f"{f' (and {len(unlabelled) - 1} more)' if len(unlabelled) > 1 else ''}, which {attr_path} "
                        f"has no attributes for; use the two files of one CelebA download")
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
