"""Reading BackdoorBench records as they lie on disk, from anywhere."""
import shutil

import numpy as np
import pytest
import torch

from backdoor_lens.errors import UserError
from backdoor_lens.models import PreActResNet18, build_model, load_weights
from backdoor_lens.record.record import load_defense, load_record, resolve_stored_path


def test_preactresnet18_has_backdoorbench_keys():
    keys = list(PreActResNet18(10).state_dict())
    assert len(keys) == 102
    assert keys[0] == "conv1.weight" and keys[-1] == "linear.bias"
    assert "layer2.0.shortcut.0.weight" in keys and "layer4.1.conv2.weight" in keys
    assert not any(k.endswith("conv1.bias") for k in keys)


def test_record_fields_come_from_the_arrays(bb):
    record = load_record(str(bb.record_dir))
    assert record.kind == "attack" and record.model_name == "preactresnet18" and record.dataset == "cifar10"
    assert record.img_size == (32, 32, 3) and record.num_classes == 10
    assert record.bd_train.poison_index.tolist() == bb.train_poison
    assert record.bd_train.indicator.sum() == len(bb.train_poison) and len(record.bd_train.indicator) == bb.n_train
    assert record.bd_test.poison_index.tolist() == bb.test_poison
    assert len(record.bd_test.indicator) == bb.n_test
    assert set(record.bd_train.bd_label.tolist()) == {bb.target}
    assert record.target_class == bb.target
    assert all(p.is_file() for p in record.bd_train.paths + record.bd_test.paths)


def test_attack_result_path_and_folder_agree(bb):
    a = load_record(str(bb.record_dir))
    b = load_record(str(bb.record_dir / "attack_result.pt"))
    assert a.path == b.path and a.bd_test.paths == b.bd_test.paths


def test_record_loads_from_another_directory_and_after_a_move(bb, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "my_record"
    shutil.copytree(bb.record_dir, moved)
    monkeypatch.chdir(tmp_path)
    record = load_record(str(moved))
    assert all(str(p).startswith(str(moved.resolve())) for p in record.bd_train.paths)
    assert all(p.is_file() for p in record.bd_train.paths)


@pytest.mark.parametrize("stored, expected", [
    ("./record/r1/bd_train_dataset/3/12.png", "bd_train_dataset/3/12.png"),
    ("/home/u/BackdoorBench/record/r1/bd_test_dataset/0/5.png", "bd_test_dataset/0/5.png"),
    ("record\\r1\\bd_train_dataset\\3\\12.png", "bd_train_dataset/3/12.png"),
])
def test_stored_paths_resolve_against_the_record(tmp_path, stored, expected):
    folder = "./record/r1/" + expected.split("/")[0]
    assert resolve_stored_path(stored, tmp_path, folder) == tmp_path / expected


def test_plain_int_keys_are_accepted(tmp_path):
    from tests.bb_fixture import load_raw, make_bb_root
    bb = make_bb_root(tmp_path)
    raw = load_raw(bb.record_dir / "attack_result.pt")
    raw["bd_train"]["bd_data_container"]["data_dict"] = {
        int(k): v for k, v in raw["bd_train"]["bd_data_container"]["data_dict"].items()}
    torch.save(raw, bb.record_dir / "attack_result.pt")
    assert load_record(str(bb.record_dir)).bd_train.poison_index.tolist() == bb.train_poison


def test_dataparallel_prefix_and_pruning_mask_load():
    torch.manual_seed(0)
    reference = PreActResNet18(10)
    sd = {f"module.{k}": v.clone() for k, v in reference.state_dict().items()}
    mask = (torch.rand_like(sd["module.linear.weight"]) > 0.5).float()
    sd["module.linear.weight_orig"] = sd.pop("module.linear.weight")
    sd["module.linear.weight_mask"] = mask
    model = load_weights(PreActResNet18(10), sd, "test")
    assert torch.equal(model.linear.weight, reference.linear.weight * mask)
    assert torch.equal(model.layer3[0].conv1.weight,
                       reference.layer3[0].conv1.weight)


def test_wrapped_backbone_loads():
    reference = PreActResNet18(10)
    sd = {(k if k.startswith("linear") else f"backbone.{k}"): v for k, v in reference.state_dict().items()}
    model = load_weights(PreActResNet18(10), sd, "test")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_mismatch_names_missing_and_unexpected_keys():
    sd = PreActResNet18(10).state_dict()
    sd["extra.weight"] = sd.pop("layer1.0.conv1.weight")
    with pytest.raises(UserError) as error:
        load_weights(PreActResNet18(10), sd, "defense x")
    assert "layer1.0.conv1.weight" in str(error.value) and "extra.weight" in str(error.value)


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(UserError, match="not in the zoo.*preactresnet18"):
        build_model("lenet9000", 10)


def test_defense_result_loads(bb, tmp_path):
    folder = tmp_path / "defense" / "ft"
    folder.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": PreActResNet18(10).state_dict()},
               folder / "defense_result.pt")
    defense = load_defense(str(folder))
    assert defense.name == "ft" and len(defense.state_dict) == 102
    assert np.isclose(len(load_defense(str(folder / "defense_result.pt")).state_dict), 102)
