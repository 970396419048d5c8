"""BackdoorBench records as they lie on disk: attack results, defense results, clean prototypes.

See DESIGN.md section 2. This is the only module that reads the raw dictionaries; everything
else sees `Record` and `PoisonState`.
"""
import numbers
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch

from backdoor_lens.record.datasets import DATASETS, dataset_info
from backdoor_lens.errors import UserError
from backdoor_lens.record.safe_load import check_file, restricted_unpickle, safe_torch_load

ATTACK_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


@dataclass
class PoisonState:
    """One poisoned dataset (bd_train or bd_test) from the record's arrays, no image decoded."""

    name: str
    indicator: np.ndarray  # bool, one per clean sample
    poison_index: np.ndarray  # sorted original indices of the poisoned samples
    bd_label: np.ndarray  # served (attack) label per entry of poison_index
    original_label: np.ndarray  # original label per entry of poison_index
    paths: list  # resolved PNG path per entry of poison_index
    original_index_array: np.ndarray

    def position(self, index: int) -> int:
        return int(np.searchsorted(self.poison_index, index))


@dataclass
class Record:
    path: Path  # the record folder
    kind: str  # "attack" or "prototype"
    model_name: str
    num_classes: int
    state_dict: dict
    data_path: str
    img_size: tuple  # (H, W, C)
    dataset: str
    bd_train: PoisonState | None
    bd_test: PoisonState | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def target_class(self) -> int | None:
        """The attack's target: the most common attack label of bd_test (None for all-to-all)."""
        state = self.bd_test if self.bd_test is not None else self.bd_train
        if state is None or len(state.bd_label) == 0:
            return None
        (label, count), = Counter(state.bd_label.tolist()).most_common(1)
        return int(label) if count >= 0.9 * len(state.bd_label) else None

    def dataset_root(self, override: str | None) -> Path | None:
        """--dataset_path, else the data folder beside BackdoorBench's root that ran the attack."""
        if override:
            return Path(override).expanduser()
        if self.dataset == "digits":
            return None
        backdoorbench_root = self.path.parent.parent
        stored = PurePosixPath(str(self.data_path).replace("\\", "/"))
        candidates = [backdoorbench_root / str(stored).lstrip("./") if not stored.is_absolute() else Path(stored),
                      backdoorbench_root / "data" / self.dataset]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        looked = " and ".join(str(c) for c in candidates)
        raise UserError(f"the {self.dataset} data was not found (looked in {looked}); "
                        f"pass --dataset_path pointing at the dataset's folder")


def resolve_stored_path(stored: str, record_dir: Path, save_folder: str) -> Path:
    """Stored paths are relative to the folder that held `record/` when the attack ran.

    Take the part after the save folder's own name (bd_train_dataset, ...), or after
    `record/<name>/`, and put it under the record folder we were given.
    """
    parts = (PureWindowsPath(stored) if "\\" in stored else PurePosixPath(stored)).parts
    folder = PurePosixPath(str(save_folder).replace("\\", "/")).name
    if folder and folder in parts:
        k = len(parts) - 1 - parts[::-1].index(folder)
        return record_dir.joinpath(*parts[k:])
    if "record" in parts:
        k = len(parts) - 1 - parts[::-1].index("record")
        if len(parts) > k + 2:
            return record_dir.joinpath(*parts[k + 2:])
    return record_dir / PurePosixPath(stored).name


def _poison_state(name: str, raw, record_dir: Path, n_classes: int) -> PoisonState | None:
    if raw is None:
        return None
    try:
        container = raw["bd_data_container"]
        data_dict = container["data_dict"]
        indicator = np.asarray(raw["poison_indicator"]).astype(bool)
        original_index_array = np.asarray(raw["original_index_array"], dtype=np.int64)
        save_folder = container.get("save_folder_path", raw.get("save_folder_path", name + "_dataset"))
    except (KeyError, TypeError) as missing:
        raise UserError(f"the record's {name} entry lacks {missing}; it is not a BackdoorBench poisoned-dataset state")
    keys = sorted(int(k) for k in data_dict)
    by_int = {int(k): v for k, v in data_dict.items()}
    bd_label, original_label, paths = [], [], []
    for key in keys:
        entry = by_int[key]
        other = entry["other_info"]
        bd_label.append(int(other[0]))
        original_label.append(int(other[1]))
        paths.append(resolve_stored_path(str(entry["path"]), record_dir, str(save_folder)))
    poison_index = np.asarray(keys, dtype=np.int64)
    if len(indicator) and len(poison_index) and poison_index.max() >= len(indicator):
        raise UserError(f"the record's {name} names sample {poison_index.max()} but its indicator has only "
                        f"{len(indicator)} entries; the record is inconsistent")
    return PoisonState(name, indicator, poison_index, np.asarray(bd_label, dtype=np.int64),
                       np.asarray(original_label, dtype=np.int64), paths, original_index_array)


def _img_size(value, dataset: str, source: str) -> tuple:
    """(H, W, C) from the record; (H, W) takes the dataset's channel count."""
    if value is None:
        return DATASETS[dataset].size
    try:
        size = tuple(int(v) for v in value if isinstance(v, numbers.Integral) and not isinstance(v, bool))
        valid = len(size) == len(value) and len(size) in (2, 3) and min(size[:2]) > 0 and size[2:] in ((), (1,), (3,))
    except TypeError:  # not a sequence
        valid = False
    if not valid:
        raise UserError(f"{source}: 'img_size' is {value!r}, not (height, width, channels) with positive sizes and "
                        f"1 or 3 channels; the file is damaged: write the dataset's image size there")
    return size if len(size) == 3 else (size[0], size[1], DATASETS[dataset].size[2])


def _num_classes(value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{source}: 'num_classes' is {value!r}, not a positive whole number; "
                        f"the record is damaged (pass --num_classes to override it)")
    return int(value)


def _state_dict(value, source: str, what: str = "key 'model'") -> dict:
    """A state_dict is a dict of parameter names to tensors; say what else the file holds."""
    if not isinstance(value, dict):
        raise UserError(f"{source}: {what} holds a {type(value).__name__}, not a state_dict (a dict of tensors); "
                        f"the file is damaged or was not written by BackdoorBench")
    odd = [str(k) for k, v in value.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise UserError(f"{source}: {what} is not a state_dict: entry {odd[0]} is not a named tensor "
                        f"({len(odd)} such entries); the file is damaged or was not written by BackdoorBench")
    return value


def find_attack_file(location: str) -> tuple[Path, str]:
    """A record folder or a file inside it -> (file, kind)."""
    path = Path(location).expanduser()
    if path.is_dir():
        for name, kind in (("attack_result.pt", "attack"), ("clean_model.pth", "prototype")):
            if (path / name).is_symlink() or (path / name).exists():
                return check_file(path / name, "record file"), kind
        raise UserError(f"{path} holds neither attack_result.pt nor clean_model.pth; "
                        f"point --result_file_attack at a BackdoorBench record folder")
    if path.is_symlink() and not path.exists():
        raise UserError(f"record {path} is a dangling symlink to {path.readlink()}; restore its target or point "
                        f"--result_file_attack at the real record folder")
    if path.is_file():
        return path, "prototype" if path.name == "clean_model.pth" else "attack"
    raise UserError(f"record {path} does not exist; point --result_file_attack at a BackdoorBench record folder")


def load_record(location: str, trust: bool = False, prototype: bool = False, model_name: str | None = None,
                dataset: str | None = None, num_classes: int | None = None) -> Record:
    file, kind = find_attack_file(location)
    if prototype and kind != "prototype":
        candidate = file.parent / "clean_model.pth"
        if not candidate.is_file():
            raise UserError(f"--prototype given but {file.parent} has no clean_model.pth")
        file, kind = candidate, "prototype"
    record_dir = file.parent.resolve()
    if kind == "prototype":
        return _load_prototype(file, record_dir, trust, model_name, dataset, num_classes)
    raw = safe_torch_load(file, trust, what="record")
    if not isinstance(raw, dict) or "model" not in raw:
        raise UserError(f"{file} is not a BackdoorBench attack result (expected a dict with keys {', '.join(ATTACK_KEYS)})")
    missing = [k for k in ("model_name", "num_classes", "model", "clean_data") if k not in raw]
    if missing:
        raise UserError(f"{file} lacks the keys {', '.join(missing)}; it is not a BackdoorBench attack result")
    name = (dataset or str(raw["clean_data"])).lower()
    dataset_info(name)
    classes = num_classes or _num_classes(raw["num_classes"], str(file))
    return Record(
        path=record_dir, kind="attack", model_name=str(model_name or raw["model_name"]), num_classes=classes,
        state_dict=_state_dict(raw["model"], str(file)), data_path=str(raw.get("data_path", f"./data/{name}")),
        img_size=_img_size(raw.get("img_size"), name, str(file)), dataset=name,
        bd_train=_poison_state("bd_train", raw.get("bd_train"), record_dir, classes),
        bd_test=_poison_state("bd_test", raw.get("bd_test"), record_dir, classes),
    )


def _read_info(path: Path, trust: bool) -> dict:
    """BackdoorBench's prototype writes info.pickle with torch.save(args.__dict__); a plain pickle
    of the same dict (pickle.dump) is read through the restricted unpickler. Neither runs code
    unless --trust_record; a refusal is always an error, never silently skipped."""
    if zipfile.is_zipfile(path):
        loaded = safe_torch_load(path, trust, what="info.pickle")
    else:
        loaded = restricted_unpickle(path, "info.pickle", trust)
    if not isinstance(loaded, dict):
        raise UserError(f"info.pickle {path} holds a {type(loaded).__name__}, not the dict of the prototype's "
                        f"arguments; remove it and pass --dataset and --model")
    return loaded


def _load_prototype(file: Path, record_dir: Path, trust: bool, model_name, dataset, num_classes) -> Record:
    state_dict = _state_dict(safe_torch_load(file, trust, what="clean model"), str(file), "the file")
    info_file = record_dir / "info.pickle"
    info = _read_info(info_file, trust) if info_file.is_file() or info_file.is_symlink() else {}
    name = (dataset or info.get("dataset") or "").lower()
    if not name:
        raise UserError(f"prototype record {record_dir} does not say its dataset; pass --dataset")
    dataset_info(name)
    model = model_name or info.get("model")
    if not model:
        raise UserError(f"prototype record {record_dir} does not say its model; pass --model")
    stored = info.get("num_classes")
    if not num_classes:
        num_classes = dataset_info(name).num_classes if stored is None else _num_classes(stored, str(info_file))
    size = info.get("img_size")
    shape_keys = ("input_height", "input_width", "input_channel")
    if size is None and all(info.get(k) is not None for k in shape_keys):
        size = tuple(info[k] for k in shape_keys)
    return Record(path=record_dir, kind="prototype", model_name=str(model), num_classes=num_classes,
                  state_dict=state_dict, data_path=str(info.get("dataset_path", f"./data/{name}")),
                  img_size=_img_size(size, name, str(info_file)), dataset=name, bd_train=None, bd_test=None)


@dataclass
class DefenseResult:
    path: Path
    name: str
    model_name: str
    num_classes: int
    state_dict: dict


def load_defense(location: str, trust: bool = False) -> DefenseResult:
    path = Path(location).expanduser()
    file = path / "defense_result.pt" if path.is_dir() else path
    if not file.is_file() and not file.is_symlink():
        raise UserError(f"defense result {file} does not exist; point --result_file_defense at "
                        f"record/<name>/defense/<defense> or its defense_result.pt")
    raw = safe_torch_load(file, trust, what="defense result")
    if not isinstance(raw, dict) or "model" not in raw:
        raise UserError(f"{file} is not a BackdoorBench defense result (expected a dict with a 'model' key)")
    classes = raw.get("num_classes")
    return DefenseResult(path=file.parent.resolve(), name=file.parent.name, model_name=str(raw.get("model_name", "")),
                         num_classes=0 if classes in (None, 0) else _num_classes(classes, str(file)),
                         state_dict=_state_dict(raw["model"], str(file)))
