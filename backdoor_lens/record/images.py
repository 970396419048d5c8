"""Decoded images and the batches built from them: the data path between a record and the model.

Every image a process serves is decoded once, into uint8 tensors, and every batch is then
assembled by indexing those tensors; conversion to float, the channel change and normalisation
happen on the device, on the whole batch. There is no per-sample Python once a split is decoded.

- Clean images of datasets held in memory (CIFAR, MNIST, the demo's digits) are the dataset's own
  array, viewed as a tensor (made contiguous once when it is a strided view).
- Clean images of folder datasets (GTSRB, Tiny-ImageNet, CelebA) and every poisoned PNG are
  decoded on first use, in chunks, by a pool of threads (PIL and OpenCV release the GIL while
  decoding), then kept: `ImageStore` holds one row per image, shared by every split of a context
  (and, under `backdoor-lens all`, by every analysis of the process).
- On CUDA, a split's images are copied to the GPU once (uint8: a quarter of the float size) and
  batches are gathered there; on a CPU they are gathered from the store.

Memory grows as H x W x C bytes per decoded image: the poisoned PNGs of the splits used (5,000
CIFAR images: 15 MB), plus the folder datasets' images read (Tiny-ImageNet's 100,000 training
images: 1.2 GB). Past the budget (BACKDOOR_LENS_DECODE_MB, default 4096 MB) a folder dataset is
not cached: its images are decoded again for every batch, so memory stays at one batch.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from backdoor_lens.device import progress

DECODE_CHUNK = 2048  # images decoded per progress step: bounds the transient memory of a decode


def decode_budget_bytes() -> int:
    """The most bytes of decoded images a store keeps per folder dataset (BACKDOOR_LENS_DECODE_MB)."""
    value = os.environ.get("BACKDOOR_LENS_DECODE_MB", "4096")
    try:
        return int(float(value) * 2**20)
    except ValueError:
        return 4096 * 2**20


def _threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def decode_all(items, decode, desc: str) -> list:
    """decode(item) for every item, by a thread pool, in chunks with a progress bar; in order."""
    items = list(items)
    if len(items) <= 64:
        return [decode(item) for item in items]
    out = []
    with ThreadPoolExecutor(_threads()) as pool:
        for start in progress(range(0, len(items), DECODE_CHUNK), desc,
                              total=(len(items) + DECODE_CHUNK - 1) // DECODE_CHUNK):
            out.extend(pool.map(decode, items[start:start + DECODE_CHUNK]))
    return out


def normal_tensors(method):
    """Run `method` outside inference mode: the store's tensors outlive the pass that first asked for
    them, and a tensor made under inference mode could not be updated, or fed to a gradient, later."""
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)

    wrapper.__doc__, wrapper.__name__ = method.__doc__, method.__name__
    return wrapper


def as_hwc(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else image[..., None]


class ImageStore:
    """uint8 images of one record, decoded once: clean datasets by sample index, poisoned PNGs by path.

    `resize(image) -> image` brings a decoded image to the model's input size (identity when the
    sizes agree); `read_poisoned(path) -> image` decodes a poisoned PNG exactly or refuses it.
    """

    def __init__(self, resize, read_poisoned):
        self._resize = resize
        self._read_poisoned = read_poisoned
        self._clean: dict = {}  # id(CleanData) -> (CleanData, tensor | None, decoded mask | None)
        self._rows: dict = {}  # poisoned path -> row of self._poisoned
        self._parts: list = []  # uint8 tensors of poisoned images, in row order
        self._poisoned: torch.Tensor | None = None

    # --- clean images ------------------------------------------------------------------------
    def _clean_entry(self, clean):
        entry = self._clean.get(id(clean))
        if entry is None:
            array = getattr(clean, "_array", None)
            if array is not None and self._resize(as_hwc(array[0])).shape == as_hwc(array[0]).shape:
                if not array.flags.c_contiguous:  # CIFAR's H x W x C view of C x H x W rows
                    array = clean._array = np.ascontiguousarray(array)  # the same values, kept once
                tensor = torch.from_numpy(array if array.ndim == 4 else array[..., None])
                entry = (clean, tensor, None)
            else:  # decoded on demand: a folder dataset, or an array at another size than the model's
                first = self._clean_image(clean, 0)
                size = len(clean) * first.nbytes
                if size <= decode_budget_bytes():
                    entry = (clean, torch.empty((len(clean),) + first.shape, dtype=torch.uint8),
                             np.zeros(len(clean), bool))
                else:
                    entry = (clean, None, None)
            self._clean[id(clean)] = entry
        return entry

    def _clean_image(self, clean, index: int) -> np.ndarray:
        return self._resize(as_hwc(clean.image(int(index))))

    @normal_tensors
    def clean_images(self, clean, indices: np.ndarray) -> torch.Tensor:
        """The clean dataset's images at `indices`, B x H x W x C uint8 (a new tensor)."""
        _, tensor, decoded = self._clean_entry(clean)
        indices = np.asarray(indices, dtype=np.int64)
        if decoded is not None:
            missing = np.unique(indices[~decoded[indices]])
            if len(missing):
                images = decode_all(missing, lambda i: self._clean_image(clean, i), f"decode {clean.name}")
                tensor[torch.from_numpy(missing)] = torch.from_numpy(np.stack(images))
                decoded[missing] = True
        if tensor is None:  # over the budget: decoded for this request only
            return torch.from_numpy(np.stack([self._clean_image(clean, i) for i in indices]))
        return tensor[torch.from_numpy(indices)]

    # --- poisoned images ---------------------------------------------------------------------
    @normal_tensors
    def poisoned_rows(self, paths) -> np.ndarray:
        """Rows of the poisoned images at `paths` (None: a clean sample, row -1), decoding new ones."""
        keys = [None if path is None else str(path) for path in paths]
        new = list(dict.fromkeys(k for k in keys if k is not None and k not in self._rows))
        if new:
            images = decode_all(new, self._read_poisoned, "decode poisoned images")
            start = len(self._rows)
            for offset, key in enumerate(new):
                self._rows[key] = start + offset
            self._parts.append(torch.from_numpy(np.stack(images)))
            self._poisoned = None
        return np.fromiter((-1 if k is None else self._rows[k] for k in keys), dtype=np.int64, count=len(keys))

    @property
    @normal_tensors
    def poisoned(self) -> torch.Tensor:
        if self._poisoned is None and self._parts:
            self._poisoned = torch.cat(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = [self._poisoned]
        return self._poisoned


class Batches:
    """The batches of a split, for one pass: (x, label, original_label, poison, index), like a
    DataLoader over the split, with x already on `device` (model input, or pixels in [0, 1] for a
    `pixels()` split) and the other four as CPU int64 tensors.

    shuffle: a seeded permutation (the same for the same seed), else the split's order.
    """

    def __init__(self, split, batch_size: int, device, shuffle: bool = False, seed: int = 0):
        self.split, self.batch_size, self.device = split, int(batch_size), torch.device(device)
        self.shuffle, self.seed = shuffle, seed

    def __len__(self) -> int:
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.split))
        return torch.randperm(len(self.split), generator=torch.Generator().manual_seed(int(self.seed)))

    def __iter__(self):
        split = self.split
        labels = torch.from_numpy(split.labels)
        originals = torch.from_numpy(split.original_labels)
        poison = torch.from_numpy(split.poison.astype(np.int64))
        indices = torch.from_numpy(split.indices)
        cuda = self.device.type == "cuda"
        # On CUDA the split's uint8 images move to the GPU once and batches are gathered there.
        source = split.decoded(self.device) if cuda else None
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            positions = order[start:start + self.batch_size]
            pixels = source[positions.to(self.device)] if cuda else split.images(positions.numpy())
            yield (split.transform.batch(pixels, split.normalized), labels[positions], originals[positions],
                   poison[positions], indices[positions])
