"""Forward passes shared between the analyses of one process (`backdoor-lens all`).

Under `backdoor-lens all`, tac, na, fm, act, actdist, fv, t-SNE, UMAP, metric, cm and detect ask for
statistics of the same model over the same images. While a `SharedPasses` is active, the first
request for a (model weights, images, batch size) pass computes its statistics for every Conv,
BatchNorm and Linear layer at once (and every layer it was asked for), and later requests that it
covers are answered from it without a forward pass: one pass per split serves every analysis.

The statistics kept are the reductions the analyses use (running sums, per-channel top-k, the
features an embedding reads, and a split's logits and penultimate features batch by batch), so
numbers are identical to a run of the analysis alone:

- a hook on more layers does not change any layer's output, and each layer's sums are its own;
- top-k lists keep ties in sample order (an exact (score, position) order), so the k best of
  the K >= k kept are exactly the k best of the split, whatever K and the batch size; the first
  request keeps K as deep as the split's poisoned count (actdist's k).

Outside `backdoor-lens all` nothing is active and every request runs its own pass. A model takes
part only when `load_context` marked it with the record it came from (`mark_weights`).
"""
import hashlib
from contextlib import contextmanager

import numpy as np

_ACTIVE = None
WEIGHTS_ATTRIBUTE = "backdoor_lens_weights"


def mark_weights(model, label: str, source: str):
    """Mark a model loaded, unchanged, from `source` (its passes may be shared); returns the model."""
    setattr(model, WEIGHTS_ATTRIBUTE, (label, source))
    return model


def active():
    return _ACTIVE


@contextmanager
def sharing(budget_bytes: int = 2 * 2**30):
    """Share passes between everything run inside the block."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, SharedPasses(budget_bytes)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def images_key(split, batch_size: int) -> str:
    """What a pass over `split` in batches of `batch_size` sees: the same key, the same inputs in the
    same batches (sample indices, poisoned image files, pixel or model space, the image store)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(split.indices).tobytes())
    digest.update("\0".join("" if p is None else str(p) for p in split.paths).encode())
    digest.update(f"|{split.normalized}|{id(split.store)}|{id(split.clean)}|{int(batch_size)}".encode())
    return digest.hexdigest()


def pass_key(model, loader) -> tuple | None:
    """The key of a pass of `model` over `loader`, or None when it cannot be shared."""
    weights = getattr(model, WEIGHTS_ATTRIBUTE, None)
    split = getattr(loader, "split", None)
    if _ACTIVE is None or weights is None or split is None or getattr(loader, "shuffle", False):
        return None
    return weights, images_key(split, loader.batch_size)


def size_of(value) -> int:
    """Bytes of the tensors and arrays in `value` (nested in dicts, lists, tuples, dataclasses)."""
    if hasattr(value, "nbytes"):  # numpy arrays
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch tensors
        return int(value.element_size() * value.nelement())
    if isinstance(value, dict):
        return sum(size_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(size_of(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(size_of(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


class SharedPasses:
    """The kept statistics, by kind and pass key, within a byte budget for all of them together:
    keeping past it lets go of the oldest entries first (a later request for one makes its pass
    again, with the same numbers); an entry larger than the whole budget is not kept."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: dict = {}  # (kind, pass key, option) -> (layers frozenset, extent, value, bytes)
        self.kept_bytes = 0
        self.passes_run = 0  # forward passes computed here (for tests and benchmarks)
        self.passes_saved = 0  # requests answered without a pass

    def find(self, kind: str, key, option, layers, extent=0):
        """A kept value covering `layers` (and `extent`: per-unit sums, top-k depth), or None."""
        entry = self.entries.get((kind, key, option))
        if entry is not None and set(layers) <= entry[0] and extent <= entry[1]:
            self.passes_saved += 1
            return entry[2]
        return None

    def keep(self, kind: str, key, option, layers, extent, value, new_pass: bool = True):
        """Keep `value`; new_pass=False for a second kind kept from a pass already counted."""
        self.passes_run += int(new_pass)
        size = size_of(value)
        replaced = self.entries.pop((kind, key, option), None)
        if replaced is not None:
            self.kept_bytes -= replaced[3]
        if size > self.budget_bytes:
            return
        while self.entries and self.kept_bytes + size > self.budget_bytes:
            self.kept_bytes -= self.entries.pop(next(iter(self.entries)))[3]  # the oldest first
        self.entries[(kind, key, option)] = (frozenset(layers), extent, value, size)
        self.kept_bytes += size
