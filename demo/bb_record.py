"""Write a record folder exactly as BackdoorBench lays one out (DESIGN.md section 2).

Used by the demo builder and by the test fixtures. Paths are stored the way BackdoorBench stores
them: `./record/<name>/bd_train_dataset/<original_label>/<original_index>.png`, relative to the
folder that holds `record/`; data_dict keys are numpy.int64.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _save_png(image: np.ndarray, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def poisoned_state(record_dir: Path, which: str, n_clean: int, poisoned: dict, original_index_array) -> dict:
    """poisoned: {original_index: (uint8 image, bd_label, original_label)}. Writes the PNGs."""
    folder = f"./record/{record_dir.name}/{which}_dataset"
    data_dict = {}
    indicator = np.zeros(n_clean, dtype=np.float64)
    for index in sorted(poisoned):
        image, bd_label, original_label = poisoned[index]
        stored = f"{folder}/{int(original_label)}/{int(index)}.png"
        _save_png(image, record_dir / f"{which}_dataset" / str(int(original_label)) / f"{int(index)}.png")
        data_dict[np.int64(index)] = {"path": stored, "other_info": [int(bd_label), int(original_label)]}
        indicator[index] = 1.0
    return {
        "bd_data_container": {"save_folder_path": folder, "save_file_format": ".png", "data_dict": data_dict},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.asarray(original_index_array, dtype=np.int64),
        "poison_indicator": indicator,
        "save_folder_path": folder,
    }


def write_attack_record(record_dir: Path, *, model_name: str, num_classes: int, state_dict: dict, dataset: str,
                        img_size: tuple, train_poison: dict | None, n_train: int, test_poison: dict | None,
                        n_test: int, data_path: str | None = None) -> Path:
    """Write attack_result.pt and the PNG folders; returns the .pt path."""
    record_dir = Path(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": {k: v.detach().cpu() for k, v in state_dict.items()},
        "data_path": data_path or f"./data/{dataset}",
        "img_size": tuple(int(v) for v in img_size),
        "clean_data": dataset,
        "bd_train": None if train_poison is None else
        poisoned_state(record_dir, "bd_train", n_train, train_poison, np.arange(n_train)),
        "bd_test": None if test_poison is None else
        poisoned_state(record_dir, "bd_test", n_test, test_poison, sorted(test_poison)),
    }
    target = record_dir / "attack_result.pt"
    torch.save(result, target)
    return target
