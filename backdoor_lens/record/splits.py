"""The dataset splits of BackdoorBench's analysis, served from the record's arrays.

A served sample is (image, label, original_label, poison_flag, original_index). Labels and flags
are known for every sample up front (`Split.labels`, `.poison`, ...), read from the record's
arrays; images are decoded only when a sample is served.

Poisoned PNGs are read exactly or refused: 16-bit samples map to 8 bits by v * 255 / 65535
rounded (exact for the v = u * 257 that an 8-bit image widened to 16 bits holds), grey is
replicated for an RGB record, an opaque alpha channel is dropped, a palette is looked up. What
cannot convert without loss (transparency, colour for a grey record) or has another size than the
record's img_size is refused with one line naming the file.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backdoor_lens.record.datasets import CleanData
from backdoor_lens.errors import UserError
from backdoor_lens.record.images import ImageStore

SPLITS = ("clean_train", "bd_train", "clean_test", "bd_test", "mixed", "subset")
POISONED_SPLITS = ("bd_train", "bd_test", "mixed", "subset")
AUTO = "auto"  # --visual_dataset auto: the first of the analysis's declared splits that the record has


def first_available(record, preferences) -> str:
    """The first split of `preferences` that the record has: bd_train and subset need the record's
    bd_train, bd_test and mixed its bd_test; the clean splits every record has."""
    for name in preferences:
        if name in ("bd_train", "subset") and record.bd_train is None:
            continue
        if name in ("bd_test", "mixed") and record.bd_test is None:
            continue
        return name
    return preferences[-1] if preferences else "clean_test"


# --- poisoned PNGs -------------------------------------------------------------------------------

def read_poisoned_image(path, image_size: tuple) -> np.ndarray:
    """A poisoned image as uint8 H x W x C for a record of image_size (H, W, C); exact or refused."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.format == "PNG" and _png_bit_depth(path) == 16:
                samples, full = _read_png16(path, img), 65535
            else:
                samples, full = _pil_samples(img, path), 255
    except (FileNotFoundError, IsADirectoryError):
        raise _not_a_file(path) from None
    except (OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as error:
        raise UserError(f"poisoned image {path} is not a readable image ({error}); restore it from the "
                        f"attack's output") from None
    if samples.shape[2] in (2, 4):  # alpha last
        if (samples[..., -1] != full).any():
            raise UserError(f"poisoned image {path} has transparent pixels; dropping its alpha channel would change "
                            f"the image: save it without transparency")
        samples = samples[..., :-1]
    if full == 65535:
        # round(v * 255 / 65535) = round(v / 257), in integers; 257 is odd, so there are no ties.
        samples = (samples.astype(np.uint32) + 128) // 257
    height, width, channels = image_size
    if samples.shape[:2] != (height, width):
        raise UserError(f"poisoned image {path} is {samples.shape[0]}x{samples.shape[1]} pixels but the record's "
                        f"images are {height}x{width} (img_size); re-create it at the record's size")
    if samples.shape[2] == 1 and channels == 3:
        samples = np.repeat(samples, 3, axis=2)
    elif samples.shape[2] == 3 and channels == 1:
        if not ((samples[..., 0] == samples[..., 1]) & (samples[..., 1] == samples[..., 2])).all():
            raise UserError(f"poisoned image {path} is a colour image but the record's images have 1 channel "
                            f"(grayscale); no exact conversion exists: save it as grayscale")
        samples = samples[..., :1]
    return np.ascontiguousarray(samples, dtype=np.uint8)


def _not_a_file(path) -> UserError:
    if Path(path).is_dir():
        return UserError(f"poisoned image {path} is a folder, not an image; the record folder is damaged")
    return UserError(f"poisoned image {path} is missing; the record folder is incomplete")


def _pil_samples(img: Image.Image, path) -> np.ndarray:
    """H x W x K samples of an image of at most 8 bits per sample, through PIL's exact conversions."""
    transparent = "transparency" in img.info
    if img.mode in ("P", "PA"):  # a palette: look the colours up
        img = img.convert("RGBA" if transparent or img.mode == "PA" else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("L", "RGB") and transparent:  # a tRNS colour key: make it an alpha channel
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        raise UserError(f"poisoned image {path} has pixel mode {img.mode}, which has no exact 8-bit grey or RGB "
                        f"form; save it as an 8-bit PNG")
    array = np.asarray(img)
    return array if array.ndim == 3 else array[..., None]


def _png_bit_depth(path) -> int:
    with open(path, "rb") as handle:
        header = handle.read(25)  # signature, IHDR length and type, width, height, bit depth
    return header[24] if len(header) == 25 else 0


def _read_png16(path, img: Image.Image) -> np.ndarray:
    """The H x W x K uint16 samples of a 16-bit PNG. PIL keeps only the high byte of 16-bit colour,
    so OpenCV (installed with grad-cam, pinned) decodes these; it returns BGR(A) order."""
    import cv2

    if "transparency" in img.info:
        # A tRNS colour key in a 16-bit image: OpenCV drops it, so we could not tell which pixels
        # are transparent. Rare enough to refuse rather than guess.
        raise UserError(f"poisoned image {path} is a 16-bit PNG with a transparent colour key; save it as an "
                        f"8-bit PNG or without transparency")
    samples = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if samples is None or samples.dtype != np.uint16:
        raise UserError(f"poisoned image {path} is not a readable 16-bit PNG; restore it from the attack's output")
    if samples.ndim == 2:
        return samples[..., None]
    order = {3: [2, 1, 0], 4: [2, 1, 0, 3]}[samples.shape[2]]
    return samples[..., order]


@dataclass
class ImageTransform:
    """uint8 H x W x C -> float C x H x W: BackdoorBench's test transform (Resize, ToTensor, Normalize)."""

    size: tuple  # (H, W)
    channels: int  # channels the model takes
    mean: tuple
    std: tuple

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 H x W x C at the model's input size (PIL bilinear, as torchvision's Resize); unchanged
        when it already has that size."""
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] == tuple(self.size):
            return image
        mode = "L" if image.shape[2] == 1 else "RGB"
        pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
        image = np.asarray(pil.resize((self.size[1], self.size[0]), Image.BILINEAR))
        return image[..., None] if image.ndim == 2 else image

    def to_unit(self, image: np.ndarray) -> torch.Tensor:
        """One image: uint8 H x W x C -> float C x H x W in [0, 1], at the model's size and channels."""
        pixels = torch.from_numpy(np.array(self.resize(image), copy=True)).unsqueeze(0)
        return self.batch(pixels, normalized=False)[0]

    def batch(self, pixels: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """A batch: uint8 B x H x W x C (already at the model's size, on any device) -> float
        B x C x H x W on the same device, in [0, 1] or normalised. The same operations, in the same
        order, as ToTensor then Normalize on each image, so the values are identical."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        elif x.shape[1] == 3 and self.channels == 1:
            x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        return self.normalize(x) if normalized else x

    def _stats(self, like: torch.Tensor):
        mean = torch.as_tensor(self.mean, dtype=like.dtype, device=like.device)
        std = torch.as_tensor(self.std, dtype=like.dtype, device=like.device)
        if mean.numel() == 1 and self.channels > 1:
            mean, std = mean.repeat(self.channels), std.repeat(self.channels)
        shape = (-1, 1, 1) if like.dim() == 3 else (1, -1, 1, 1)
        return mean.view(shape), std.view(shape)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> pixel space [0, 1]."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0, 1)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalize(self.to_unit(image))


class Split(torch.utils.data.Dataset):
    """Samples of one split. Per-sample arrays are public; images are decoded on first use into the
    split's `ImageStore` (shared by the splits of one context) and served from there.

    image_size: the record's (H, W, C), which every poisoned PNG must have (after exact conversion).
    """

    def __init__(self, name: str, clean: CleanData, indices, poison, labels, original_labels, paths,
                 transform: ImageTransform, image_size: tuple, normalized: bool = True, store: ImageStore | None = None):
        self.name = name
        self.clean = clean
        self.indices = np.asarray(indices, dtype=np.int64)
        self.poison = np.asarray(poison, dtype=bool)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.original_labels = np.asarray(original_labels, dtype=np.int64)
        self.paths = list(paths)
        self.transform = transform
        self.image_size = tuple(image_size)
        self.normalized = normalized
        self.store = store or new_store(transform, self.image_size)
        self._rows: np.ndarray | None = None  # row of each poisoned sample in the store, -1 for clean ones
        self._on_device: tuple | None = None  # (device, N x H x W x C uint8) once copied there

    def __len__(self) -> int:
        return len(self.indices)

    def poisoned_rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = self.store.poisoned_rows(self.paths)
        return self._rows

    def images(self, positions) -> torch.Tensor:
        """uint8 B x H x W x C at the model's size: the samples at `positions`, decoded once per store."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.poisoned_rows()[positions]
        poisoned = rows >= 0
        if len(rows) and poisoned.all():
            return self.store.poisoned[torch.from_numpy(rows)]
        pixels = self.store.clean_images(self.clean, self.indices[positions])
        if poisoned.any():
            images = self.store.poisoned[torch.from_numpy(rows[poisoned])]
            if images.shape[-1] != pixels.shape[-1]:  # grey beside colour: both served as colour
                pixels, images = (p.expand(*p.shape[:-1], 3) if p.shape[-1] == 1 else p for p in (pixels, images))
                pixels = pixels.contiguous()
            pixels[torch.from_numpy(poisoned)] = images
        return pixels

    def decoded(self, device) -> torch.Tensor:
        """All of the split's images, uint8 N x H x W x C, on `device` (kept for the next pass)."""
        device = torch.device(device)
        if self._on_device is None or self._on_device[0] != device:
            with torch.inference_mode(False):  # kept past this pass: a normal tensor (see images.py)
                self._on_device = (device, self.images(np.arange(len(self))).to(device))
        return self._on_device[1]

    def image_uint8(self, position: int) -> np.ndarray:
        return self.images([position])[0].numpy()

    def __getitem__(self, position: int):
        x = self.transform.batch(self.images([position]), self.normalized)[0]
        return (x, int(self.labels[position]), int(self.original_labels[position]), int(self.poison[position]),
                int(self.indices[position]))

    def _derived(self, name, positions=None, **changes) -> "Split":
        fields = dict(indices=self.indices, poison=self.poison, labels=self.labels,
                      original_labels=self.original_labels, paths=self.paths)
        if positions is not None:
            fields = {k: (np.asarray(v)[positions] if k != "paths" else [v[p] for p in positions])
                      for k, v in fields.items()}
        fields.update(changes)
        return Split(name, self.clean, fields["indices"], fields["poison"], fields["labels"],
                     fields["original_labels"], fields["paths"], self.transform, self.image_size,
                     changes.get("normalized", self.normalized), store=self.store)

    def take(self, positions, name: str | None = None) -> "Split":
        return self._derived(name or self.name, np.asarray(positions, dtype=np.int64))

    def clean_twin(self) -> "Split":
        """The same samples served clean (original image and label); this split is not changed."""
        return self._derived(self.name + "_clean_twin", poison=np.zeros(len(self), bool),
                             labels=self.original_labels, paths=[None] * len(self))

    def pixels(self) -> "Split":
        """The same samples in pixel space [0, 1] instead of model input."""
        return self._derived(self.name, normalized=False)

    def only_poisoned(self) -> "Split":
        return self.take(np.flatnonzero(self.poison), self.name)

    def batch(self, positions) -> tuple:
        """The given samples as one batch of CPU tensors (x, label, original_label, poison, index)."""
        positions = np.asarray(positions, dtype=np.int64)
        return (self.transform.batch(self.images(positions), self.normalized), torch.from_numpy(self.labels[positions]),
                torch.from_numpy(self.original_labels[positions]),
                torch.from_numpy(self.poison[positions].astype(np.int64)), torch.from_numpy(self.indices[positions]))


def new_store(transform: ImageTransform, image_size: tuple) -> ImageStore:
    """An empty store for a record of image_size (H, W, C) served through `transform`."""
    size = tuple(image_size)
    return ImageStore(transform.resize, lambda path: transform.resize(read_poisoned_image(path, size)))


def _clean_split(name, data: CleanData, transform, image_size) -> Split:
    n = len(data)
    return Split(name, data, np.arange(n), np.zeros(n, bool), data.labels.copy(), data.labels.copy(), [None] * n,
                 transform, image_size)


def _poisoned_train(data: CleanData, state, transform, image_size) -> Split:
    n = len(data)
    labels = data.labels.copy()
    paths = [None] * n
    poison = np.zeros(n, bool)
    poison[state.poison_index] = True
    labels[state.poison_index] = state.bd_label
    for index, path in zip(state.poison_index, state.paths):
        paths[index] = path
    return Split("bd_train", data, np.arange(n), poison, labels, data.labels, paths, transform, image_size)


def _poisoned_test(data: CleanData, state, transform, image_size) -> Split:
    idx = state.poison_index
    return Split("bd_test", data, idx, np.ones(len(idx), bool), state.bd_label, data.labels[idx],
                 list(state.paths), transform, image_size)


def _mixed(data: CleanData, state, transform, image_size, pratio: float, target, rng) -> Split:
    """BackdoorBench's mix dataset (analysis/visual_utils.py, generate_mix_dataset): the N clean test
    samples, of which int(N * pratio) non-target ones that have a poisoned version in bd_test are
    served poisoned in place of their clean selves. N samples in all; the count is truncated as there."""
    n = len(data)
    candidates = state.poison_index
    if target is not None:
        candidates = candidates[data.labels[candidates] != target]
    count = int(n * pratio)
    if count > len(candidates):
        most = math.floor(len(candidates) / n * 10000) / 10000
        raise UserError(f"--pratio {pratio} asks for {count} poisoned samples among the {n} of mixed, but the "
                        f"record's bd_test has only {len(candidates)} non-target poisoned test samples; "
                        f"use --pratio {most} or less")
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    from_state = np.searchsorted(state.poison_index, chosen)
    split = _clean_split("mixed", data, transform, image_size)
    split.poison[chosen] = True
    split.labels[chosen] = state.bd_label[from_state]
    for index, k in zip(chosen, from_state):
        split.paths[index] = state.paths[k]
    return split


def _check_fits(state, data: CleanData, what: str) -> None:
    """The record's poisoned-dataset state against the clean dataset it indexes into."""
    n = len(data)
    if len(state.indicator) != n:
        raise UserError(f"the record's {state.name} poison_indicator has {len(state.indicator)} entries but the clean "
                        f"{what} has {n} samples; the record was made on other data: check --dataset_path")
    index = state.poison_index
    if len(index) and (index.min() < 0 or index.max() >= n):
        outside = index[(index < 0) | (index >= n)][0]
        raise UserError(f"the record's {state.name} names sample {outside} but the clean {what} has only {n} samples; "
                        f"the record was made on other data: check --dataset_path")


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise UserError(f"{what} {outside[0]} but the record's classes are 0..{num_classes - 1}; "
                        f"check --dataset_path, --dataset and --num_classes")


def stratified_positions(split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positions drawn proportionally from each (served label, poison flag) stratum."""
    if n >= len(split):
        return np.arange(len(split))
    strata = split.labels * 2 + split.poison.astype(np.int64)
    keys, counts = np.unique(strata, return_counts=True)
    quota = np.floor(counts * n / len(split)).astype(int)
    remainder = counts * n / len(split) - quota
    for k in np.argsort(-remainder)[: n - quota.sum()]:
        quota[k] += 1
    chosen = [rng.choice(np.flatnonzero(strata == key), size=q, replace=False) for key, q in zip(keys, quota) if q]
    return np.sort(np.concatenate(chosen))


def kept_classes(num_classes: int, c_sub: int, target: int | None) -> np.ndarray:
    """The first c_sub classes, the attack target always among them."""
    order = [target] if target is not None else []
    order += [c for c in range(num_classes) if c != target]
    return np.sort(np.asarray(order[:c_sub], dtype=np.int64))


def build_split(name: str, record, train: CleanData | None, test: CleanData | None, transform: ImageTransform,
                *, n_sub=None, c_sub=None, pratio: float = 0.1, target=None, seed: int = 0,
                store: ImageStore | None = None) -> Split:
    """One of SPLITS, with --c_sub then --n_sub applied; its images are decoded into `store` (a new
    one when None), which a context shares between all its splits."""
    if name not in SPLITS:
        raise UserError(f"unknown --visual_dataset {name!r}; choose one of {', '.join(SPLITS)}")
    rng = np.random.default_rng(seed)
    if name in ("bd_train", "subset") and record.bd_train is None:
        what = "poisoned training samples" if record.kind == "attack" else "poisoned samples"
        raise UserError(f"split {name} needs {what} (bd_train), which this {_kind(record)} does not have; "
                        f"use clean_train, clean_test{', bd_test or mixed' if record.bd_test is not None else ''}")
    if name in ("bd_test", "mixed") and record.bd_test is None:
        raise UserError(f"split {name} needs poisoned test samples (bd_test), which this {_kind(record)} "
                        f"does not have; use clean_train or clean_test")
    size = tuple(record.img_size)
    data, what = (train, "training set") if name in ("clean_train", "bd_train", "subset") else (test, "test set")
    state = {"bd_train": record.bd_train, "subset": record.bd_train, "bd_test": record.bd_test,
             "mixed": record.bd_test}.get(name)
    # Where the record meets the dataset: its arrays must index into it and its labels fit the classes.
    _check_labels(data.labels, record.num_classes, f"the clean {what} has label")
    if state is not None:
        _check_fits(state, data, what)
        _check_labels(state.bd_label, record.num_classes, f"the record's {state.name} gives attack label")
    if name in ("clean_train", "clean_test"):
        split = _clean_split(name, data, transform, size)
    elif name == "bd_train":
        split = _poisoned_train(data, state, transform, size)
    elif name == "bd_test":
        split = _poisoned_test(data, state, transform, size)
    elif name == "subset":
        split = _poisoned_train(data, state, transform, size)
        n_sub = 5000 if n_sub is None else n_sub
    else:
        split = _mixed(data, state, transform, size, pratio, target, rng)
    if store is not None:
        split.store = store
    if c_sub is not None:
        if c_sub < 1:
            raise UserError(f"--c_sub {c_sub} must be at least 1")
        keep = np.isin(split.labels, kept_classes(record.num_classes, c_sub, target))
        split = split.take(np.flatnonzero(keep), split.name)
    if n_sub is not None:
        if n_sub < 1:
            raise UserError(f"--n_sub {n_sub} must be at least 1")
        split = split.take(stratified_positions(split, n_sub, rng), split.name)
    if len(split) == 0:
        raise UserError(f"split {name} has no samples after filtering (--n_sub/--c_sub); loosen the filters")
    # A missing PNG is refused now, before any model runs, rather than midway through a pass.
    for path in split.paths:
        if path is not None and not Path(path).is_file():
            raise _not_a_file(path)
    return split


def _kind(record) -> str:
    return "clean prototype record" if record.kind == "prototype" else "record"
