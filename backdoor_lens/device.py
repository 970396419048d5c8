"""Device choice, seeding and progress bars."""
import os
import random

import numpy as np
import torch
from tqdm.auto import tqdm

from backdoor_lens.errors import UserError

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def progress(iterable, desc: str = "", total=None, **kwargs):
    """tqdm over a loop on data; silent with --quiet or when the loop is tiny."""
    return tqdm(iterable, desc=desc, total=total, disable=_QUIET, leave=False, dynamic_ncols=True, **kwargs)


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present, CPU otherwise; an explicit request is honoured or refused clearly."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device name; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} asked for CUDA but none is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def fill_device_defaults(args, defaults: dict) -> tuple[dict, str]:
    """Give the cost flags `args` leaves unset (None) the values of this device's kind, from
    defaults["cpu"] or defaults["gpu"], in `args` itself (so that the context and run.json see
    them). Returns ({flag: value} of the flags filled, "cpu" or "gpu")."""
    kind = "cpu" if pick_device(args.device).type == "cpu" else "gpu"
    filled = {flag: value for flag, value in defaults[kind].items() if getattr(args, flag, None) is None}
    for flag, value in filled.items():
        setattr(args, flag, value)
    return filled, kind
