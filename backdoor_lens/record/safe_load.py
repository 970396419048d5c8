"""Reading the pickles users bring (records, info.pickle, CIFAR batches) without running their code.

Unpickling may call any function the file names, so every reader here allows a short list of
globals and refuses anything else by name:
- torch files (attack_result.pt, defense_result.pt, clean_model.pth, info.pickle as torch.save
  writes it): `torch.load(weights_only=True)` plus the numpy globals an array of any standard
  dtype, an empty array, or a numpy scalar key needs, under both spellings (numpy 2 writes
  `numpy._core`, numpy 1 wrote `numpy.core`);
- plain pickles (CIFAR batches and meta, info.pickle written with pickle.dump): `RestrictedUnpickler`,
  which builds dicts, lists, strings, bytes, numbers and numpy arrays and nothing else.
`--trust_record` (record files only, never the dataset) lifts the allow-list and says so once.
"""
import pickle
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from backdoor_lens.errors import UserError

TRUST_RISK = "--trust_record runs code stored in the file; use it only for files you trust"

# The dtype classes torch's weights_only loader checks when it restores a numpy dtype: every
# standard numeric, boolean and fixed-width text dtype. Object arrays (ObjectDType) stay out.
_DTYPE_CLASSES = ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
                  "UInt32DType", "UInt64DType", "LongDType", "ULongDType", "LongLongDType", "ULongLongDType",
                  "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType", "Complex64DType",
                  "Complex128DType", "CLongDoubleDType", "BytesDType", "StrDType")


def _numpy_globals() -> list:
    from numpy._core import multiarray

    allowed = []
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed.append((multiarray._reconstruct, f"{module}._reconstruct"))
        allowed.append((multiarray.scalar, f"{module}.scalar"))
    allowed.append((np.ndarray, "numpy.ndarray"))
    allowed.append((np.dtype, "numpy.dtype"))
    # An empty array's data is b"", which protocol 2 (torch.save's) writes as a call of bytes().
    allowed.append((bytes, "builtins.bytes"))
    for name in _DTYPE_CLASSES:
        dtype_class = getattr(np.dtypes, name, None)
        if dtype_class is not None:
            allowed.append((dtype_class, f"numpy.dtypes.{name}"))
    return allowed


ALLOWED_GLOBALS = _numpy_globals()

# torch's refusals name the global in one of these shapes, depending on the pickle opcode.
_REFUSED_RE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")

_warned = False


def warn_trusted(path: Path) -> None:
    """One line on stderr per process: the user chose to run whatever the record holds."""
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: reading {path} without the allow-list because of --trust_record, which runs code "
              f"stored in the file; use it only for files you trust", file=sys.stderr)


def check_file(path: Path, what: str) -> Path:
    """The file must exist; a dangling symlink says where it points."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{what} {path} is a dangling symlink to {path.readlink()}; restore its target or point "
                        f"at the real file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    return path


def safe_torch_load(path: Path, trust_record: bool = False, what: str = "file"):
    """torch.load with the allow-list; UserError on anything unreadable or not allowed.
    trust_record: only True when the user typed --trust_record (the one unsafe path)."""
    path = check_file(path, what)
    trusted = trust_record is True  # --trust_record on the command line, never a YAML or a default
    try:
        if trusted:
            warn_trusted(path)
        with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
            # A plain pickle (not torch.save's) draws a protocol warning before the refusal below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # The allow-list (weights_only) is lifted only under --trust_record: the one load that
            # may run code stored in the file.
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        match = _REFUSED_RE.search(str(error))
        if match and not trusted:
            name = next(group for group in match.groups() if group)
            raise UserError(f"{what} {path} needs the global {name}, which is not on the allow-list of numpy and "
                            f"torch types; {TRUST_RISK}") from None
        raise UserError(f"{what} {path} is not a readable torch file ({_unpickler_reason(error)}); "
                        f"check that it is complete and was written by torch.save") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse a user's file is the user's to fix
        raise UserError(f"{what} {path} is not a readable torch file ({_first_line(error)}); "
                        f"check that it is complete and was written by torch.save") from None


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str, reason: str = ""):
        super().__init__(name)
        self.name = name
        self.reason = reason


def _latin1_encode(text, encoding="utf-8"):
    """_codecs.encode as protocol 2 uses it for bytes (text, 'latin1'); any other codec is refused."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise RefusedGlobal("_codecs.encode", f"with codec {encoding!r}; only latin1 is data")
    return text.encode("latin1")


def _plain_globals() -> dict:
    from numpy._core import multiarray, numeric

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy._core.numeric", "numpy.core.numeric"):  # arrays pickled with protocol 5
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    for module in ("builtins", "__builtin__"):  # Python 2 names builtins __builtin__
        allowed[(module, "bytes")] = bytes
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Every global a pickle names (GLOBAL, STACK_GLOBAL, INST, extension codes) passes find_class."""

    ALLOWED = _plain_globals()

    def find_class(self, module, name):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found


def restricted_unpickle(path: Path, what: str, trust_record: bool = False):
    """A plain pickle holding only containers, strings, bytes, numbers and numpy arrays.

    Python 2 strings (the official CIFAR files) are read as latin1, as torchvision does, so their
    keys come back as str; Python 3 writers' bytes stay bytes.
    """
    path = check_file(path, what)
    try:
        with open(path, "rb") as handle:
            trusted = trust_record is True  # --trust_record on the command line, never a YAML or a default
            if trusted:
                warn_trusted(path)
            # Every global passes the allow-list (RestrictedUnpickler) unless --trust_record was given.
            unpickler = pickle.Unpickler if trusted else RestrictedUnpickler
            return unpickler(handle, encoding="latin1").load()
    except RefusedGlobal as refused:
        reason = f" {refused.reason}" if refused.reason else ""
        raise UserError(f"{what} {path} asks for the global {refused.name}{reason}, which such a file never "
                        f"needs; it was not read, because unpickling it could run code. Replace it with a clean "
                        f"copy") from None
    except Exception as error:  # noqa: BLE001 - a damaged file may fail in any way while unpickling
        raise UserError(f"{what} {path} is not a readable pickle ({_first_line(error)}); "
                        f"replace it with a complete copy") from None


def _unpickler_reason(error: Exception) -> str:
    """torch wraps the reason in paragraphs of advice; keep the line after 'WeightsUnpickler error:'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for k, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or (lines[k + 1] if k + 1 < len(lines) else "")
            return reason[:160] or _first_line(error)
    return _first_line(error)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:160]
