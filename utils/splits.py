"""The dataset splits of BackdoorBench's analysis, served from the record's arrays.

A served sample is (image, label, original_label, poison_flag, original_index). Labels and flags
are known for every sample up front (`Split.labels`, `.poison`, ...), read from the record's
arrays; images are decoded only when a sample is served.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .datasets import CleanData
from .errors import UserError

SPLITS = ("clean_train", "bd_train", "clean_test", "bd_test", "mixed", "subset")
POISONED_SPLITS = ("bd_train", "bd_test", "mixed", "subset")


@dataclass
class ImageTransform:
    """uint8 H x W x C -> float C x H x W: BackdoorBench's test transform (Resize, ToTensor, Normalize)."""

    size: tuple  # (H, W)
    channels: int  # channels the model takes
    mean: tuple
    std: tuple

    def to_unit(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] != tuple(self.size):
            mode = "L" if image.shape[2] == 1 else "RGB"
            pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
            image = np.asarray(pil.resize((self.size[1], self.size[0]), Image.BILINEAR))
            if image.ndim == 2:
                image = image[..., None]
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
        if x.shape[0] == 1 and self.channels == 3:
            x = x.expand(3, -1, -1).clone()
        elif x.shape[0] == 3 and self.channels == 1:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        return x

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
    """Samples of one split. Per-sample arrays are public; images decode on access."""

    def __init__(self, name: str, clean: CleanData, indices, poison, labels, original_labels, paths,
                 transform: ImageTransform, normalized: bool = True):
        self.name = name
        self.clean = clean
        self.indices = np.asarray(indices, dtype=np.int64)
        self.poison = np.asarray(poison, dtype=bool)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.original_labels = np.asarray(original_labels, dtype=np.int64)
        self.paths = list(paths)
        self.transform = transform
        self.normalized = normalized

    def __len__(self) -> int:
        return len(self.indices)

    def image_uint8(self, position: int) -> np.ndarray:
        path = self.paths[position]
        if path is None:
            image = self.clean.image(int(self.indices[position]))
            return image if image.ndim == 3 else image[..., None]
        try:
            with Image.open(path) as img:
                if img.mode in ("L", "1", "I", "I;16"):
                    return np.asarray(img.convert("L"))[..., None]
                return np.asarray(img.convert("RGB"))
        except FileNotFoundError:
            raise UserError(f"poisoned image {path} is missing; the record folder is incomplete") from None

    def __getitem__(self, position: int):
        image = self.image_uint8(position)
        x = self.transform(image) if self.normalized else self.transform.to_unit(image)
        return (x, int(self.labels[position]), int(self.original_labels[position]), int(self.poison[position]),
                int(self.indices[position]))

    def take(self, positions, name: str | None = None) -> "Split":
        positions = np.asarray(positions, dtype=np.int64)
        return Split(name or self.name, self.clean, self.indices[positions], self.poison[positions],
                     self.labels[positions], self.original_labels[positions],
                     [self.paths[p] for p in positions], self.transform, self.normalized)

    def clean_twin(self) -> "Split":
        """The same samples served clean (original image and label); this split is not changed."""
        return Split(self.name + "_clean_twin", self.clean, self.indices, np.zeros(len(self), bool),
                     self.original_labels, self.original_labels, [None] * len(self), self.transform,
                     self.normalized)

    def pixels(self) -> "Split":
        """The same samples in pixel space [0, 1] instead of model input."""
        return Split(self.name, self.clean, self.indices, self.poison, self.labels, self.original_labels,
                     self.paths, self.transform, normalized=False)

    def only_poisoned(self) -> "Split":
        return self.take(np.flatnonzero(self.poison), self.name)

    def batch(self, positions) -> tuple:
        """Stack the given samples into tensors (for small hand-picked sets of images)."""
        items = [self[int(p)] for p in positions]
        return (torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]),
                torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items]),
                torch.tensor([it[4] for it in items]))


def _clean_split(name, data: CleanData, transform) -> Split:
    n = len(data)
    return Split(name, data, np.arange(n), np.zeros(n, bool), data.labels, data.labels, [None] * n, transform)


def _poisoned_train(data: CleanData, state, transform) -> Split:
    n = len(data)
    labels = data.labels.copy()
    paths = [None] * n
    poison = np.zeros(n, bool)
    poison[state.poison_index] = True
    labels[state.poison_index] = state.bd_label
    for index, path in zip(state.poison_index, state.paths):
        paths[index] = path
    return Split("bd_train", data, np.arange(n), poison, labels, data.labels, paths, transform)


def _poisoned_test(data: CleanData, state, transform) -> Split:
    idx = state.poison_index
    return Split("bd_test", data, idx, np.ones(len(idx), bool), state.bd_label, data.labels[idx],
                 list(state.paths), transform)


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
                *, n_sub=None, c_sub=None, pratio: float = 0.1, target=None, seed: int = 0) -> Split:
    """One of SPLITS, with --c_sub then --n_sub applied."""
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
    if name == "clean_train":
        split = _clean_split(name, train, transform)
    elif name == "clean_test":
        split = _clean_split(name, test, transform)
    elif name == "bd_train":
        split = _poisoned_train(train, record.bd_train, transform)
    elif name == "bd_test":
        split = _poisoned_test(test, record.bd_test, transform)
    elif name == "subset":
        split = _poisoned_train(train, record.bd_train, transform)
        n_sub = 5000 if n_sub is None else n_sub
    else:
        clean = _clean_split("clean_test", test, transform)
        bd = _poisoned_test(test, record.bd_test, transform)
        count = min(len(bd), int(round(pratio * len(clean))))
        pick = np.sort(rng.choice(len(bd), size=count, replace=False))
        bd = bd.take(pick)
        split = Split("mixed", test, np.concatenate([clean.indices, bd.indices]),
                      np.concatenate([clean.poison, bd.poison]), np.concatenate([clean.labels, bd.labels]),
                      np.concatenate([clean.original_labels, bd.original_labels]), clean.paths + bd.paths, transform)
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
    return split


def _kind(record) -> str:
    return "clean prototype record" if record.kind == "prototype" else "record"
