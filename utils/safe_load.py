"""Loading BackdoorBench's torch.save files without running arbitrary pickled code.

`torch.load(weights_only=True)` refuses any global it does not know. BackdoorBench's records
hold numpy arrays and numpy integer keys, which need exactly the numpy globals below; they are
allowed under both spellings (numpy 2 writes `numpy._core`, numpy 1 wrote `numpy.core`). Any
other global is refused by name; `--trust_record` is the explicit opt-out.
"""
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def _numpy_globals():
    from numpy._core import multiarray

    allowed = []
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed.append((multiarray._reconstruct, f"{module}._reconstruct"))
        allowed.append((multiarray.scalar, f"{module}.scalar"))
    allowed.append((np.ndarray, "numpy.ndarray"))
    allowed.append((np.dtype, "numpy.dtype"))
    for dtype_class in ("Int64DType", "Float64DType", "Int32DType", "Float32DType", "BoolDType", "UInt8DType"):
        allowed.append((getattr(np.dtypes, dtype_class), f"numpy.dtypes.{dtype_class}"))
    return allowed


ALLOWED_GLOBALS = _numpy_globals()
_GLOBAL_RE = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL|global) ([\w.]+)", re.IGNORECASE)


def safe_torch_load(path: Path, trust: bool = False, what: str = "file"):
    """torch.load with an allow-list; UserError on anything unreadable or not allowed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")

    def loader():
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)  # the user passed --trust_record
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return loader()
    except pickle.UnpicklingError as error:
        match = _GLOBAL_RE.search(str(error))
        if match and not trust:
            raise UserError(
                f"{what} {path} needs the global {match.group(1)}, which is not on the safe list of "
                f"numpy/torch types; if you trust this file, rerun with --trust_record"
            ) from None
        raise UserError(f"{what} {path} is not a readable torch file ({_first_line(error)}); "
                        f"check that the file is complete") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse a user's file is the user's to fix
        raise UserError(f"{what} {path} is not a readable torch file ({_first_line(error)}); "
                        f"check that it is complete and was written by torch.save") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:160]
