"""Directions in weight space (Li et al., 2018, "Visualizing the Loss Landscape of Neural Nets").

A direction d holds one tensor per entry of the model's parameters (`dir_type="weights"`) or of
its whole state_dict (`"states"`, which also moves BatchNorm's running statistics). Grid point
(a, b) is the model with entries w + a*dx + b*dy.

Normalisation of a random direction d ~ N(0, I), per entry w of the model:
  filter: every filter d_i (a slice along the first axis: a convolution's output channel, a
          linear layer's row) is rescaled to the norm of the matching weight filter,
          d_i <- d_i * ||w_i|| / ||d_i||; a unit step moves each filter by its own size, so
          landscapes of networks with different weight scales compare;
  layer:  d <- d * ||w|| / ||d|| for the whole tensor;
  weight: d <- d * w, element-wise;
  none:   d as drawn.
Entries with at most one axis (biases, BatchNorm's affine weights and statistics) stay fixed
(d = 0) with ignore="biasbn"; with ignore="none" they move along themselves (d = w), which is
Li et al.'s choice. A direction towards a second model is the plain difference w2 - w of every
entry, so that a = 1 is exactly that model (with dir_type="states" including BN statistics).
"""
import hashlib
from dataclasses import dataclass

import torch

from backdoor_lens.errors import UserError

DIR_TYPES = ("weights", "states")
NORMS = ("filter", "layer", "weight", "none")
IGNORES = ("biasbn", "none")
_EPS = 1e-10


def base_entries(model: torch.nn.Module, dir_type: str) -> dict:
    """The entries a direction moves, detached and copied to the CPU: w in w + a*dx + b*dy.

    "weights": the trainable parameters; "states": every floating-point entry of the state_dict
    (parameters plus BatchNorm running means and variances; integer counters are left out).
    """
    if dir_type not in DIR_TYPES:
        raise UserError(f"--dir_type {dir_type!r} is unknown; use one of {', '.join(DIR_TYPES)}")
    if dir_type == "weights":
        items = model.named_parameters()
    else:
        items = ((k, v) for k, v in model.state_dict().items() if torch.is_floating_point(v))
    return {name: value.detach().to("cpu", copy=True) for name, value in items}


def normalize_direction(d: torch.Tensor, w: torch.Tensor, norm: str) -> torch.Tensor:
    """Rescale d (in place) against the weights w it will move; see the module docstring."""
    if norm == "filter":
        if d.dim() == 0:
            d.mul_(w.norm() / (d.norm() + _EPS))
            return d
        flat_d, flat_w = d.view(d.shape[0], -1), w.reshape(w.shape[0], -1)
        scale = flat_w.norm(dim=1) / (flat_d.norm(dim=1) + _EPS)
        flat_d.mul_(scale[:, None])
    elif norm == "layer":
        d.mul_(w.norm() / (d.norm() + _EPS))
    elif norm == "weight":
        d.mul_(w)
    elif norm != "none":
        raise UserError(f"direction normalisation {norm!r} is unknown; use one of {', '.join(NORMS)}")
    return d


def random_direction(base: dict, norm: str = "filter", ignore: str = "biasbn",
                     generator: torch.Generator | None = None) -> dict:
    """A Gaussian direction over `base`'s entries, normalised entry by entry against them."""
    if ignore not in IGNORES:
        raise UserError(f"ignore {ignore!r} is unknown; use one of {', '.join(IGNORES)}")
    direction = {}
    for name, w in base.items():
        # Drawn for every entry, even ignored ones, so that an entry's draw does not depend on
        # whether earlier entries were ignored.
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.dtype)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
        else:
            normalize_direction(d, w, norm)
        direction[name] = d
    return direction


def difference_direction(base: dict, other: dict, label: str = "second model") -> dict:
    """other - base for every entry: a = 1 along it reaches the other model."""
    missing = sorted(set(base) - set(other))
    if missing:
        raise UserError(f"the {label} lacks entries of the analysed model ({', '.join(missing[:3])}); "
                        f"directions between models need the same architecture")
    bad = [n for n in base if tuple(other[n].shape) != tuple(base[n].shape)]
    if bad:
        raise UserError(f"the {label} differs in shape at {', '.join(bad[:3])}; "
                        f"directions between models need the same architecture")
    return {name: other[name].to(w.dtype) - w for name, w in base.items()}


def make_directions(base: dict, *, two_d: bool, seed: int, xnorm: str = "filter", ynorm: str = "filter",
                    xignore: str = "biasbn", yignore: str = "biasbn", same_dir: bool = False,
                    target: dict | None = None) -> tuple:
    """(dx, dy) with dy None for a 1-D landscape.

    target: the entries of a second model; dx is then the difference to it, and dy (2-D) random.
    Random draws come from one CPU generator seeded with `seed`: dx first, then dy.
    """
    generator = torch.Generator().manual_seed(int(seed))
    if target is not None:
        dx = difference_direction(base, target, "defense model")
    else:
        dx = random_direction(base, xnorm, xignore, generator)
    dy = None
    if two_d:
        if same_dir:
            dy = {name: d.clone() for name, d in dx.items()}
        else:
            dy = random_direction(base, ynorm, yignore, generator)
    return dx, dy


@dataclass(frozen=True)
class DirectionSettings:
    """How a landscape's directions are made (see the module docstring): everything about them
    that decides the numbers. to_second_model: dx is the difference to a second model (its name,
    e.g. "defense"), None for a random dx."""

    dir_type: str = "weights"
    xnorm: str = "filter"
    ynorm: str = "filter"
    xignore: str = "biasbn"
    yignore: str = "biasbn"
    same_dir: bool = False
    seed: int = 0
    to_second_model: str | None = None

    def make(self, base: dict, two_d: bool, target: dict | None = None) -> tuple:
        """(dx, dy) over `base`, by make_directions; target: the second model's entries."""
        return make_directions(base, two_d=two_d, seed=self.seed, xnorm=self.xnorm, ynorm=self.ynorm,
                               xignore=self.xignore, yignore=self.yignore, same_dir=self.same_dir, target=target)


def fingerprint(*entry_dicts) -> str:
    """A short hash of tensors' names and bytes (to recognise the same model in a stored run)."""
    digest = hashlib.sha1()
    for entries in entry_dicts:
        if entries is None:
            continue
        for name in sorted(entries):
            tensor = entries[name].detach().to("cpu").contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
