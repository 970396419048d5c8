"""What is trusted and what is not: hostile pickles never run, harmless records always load, and
malformed records end with one line naming the file or key.

A hostile file creates a marker file when unpickled the unsafe way; the marker must never appear.
"""
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from tests.bb_fixture import class_images, load_raw, make_bb_root, write_cifar10, write_prototype
from backdoor_lens.record.datasets import open_clean_dataset
from backdoor_lens.errors import UserError
from backdoor_lens.record.record import load_record
from backdoor_lens.record.safe_load import restricted_unpickle, safe_torch_load
from tests.helpers import refusal as stop_with_one_line

RISK = "runs code stored in the file"


class Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def refusal(argv, out) -> str:
    """backdoor-lens cm in this process: exit code 2, one line on stderr, nothing written."""
    return stop_with_one_line("cm", argv, out)

def write_hostile_cifar(base, marker, names=("test_batch",) + tuple(f"data_batch_{k}" for k in range(1, 6))):
    for name in names:
        with open(base / name, "wb") as handle:
            pickle.dump({b"data": Hostile(marker), b"labels": [0]}, handle)


# --- 1. dataset pickles never run code -----------------------------------------------------------

def test_hostile_cifar_via_the_records_data_path_is_refused(tmp_path, script):
    bb = make_bb_root(tmp_path / "bb", n_train=20, n_test=12)
    marker = tmp_path / "MARKER"
    write_hostile_cifar(bb.data_dir / "cifar-10-batches-py", marker)
    out = tmp_path / "out"
    result = script("visual_metric.py", "--result_file_attack", bb.record_dir, "--output_dir", out, "--quiet",
                    "--device", "cpu", cwd=tmp_path)
    line = one_error_line(result)
    assert "posix.system" in line and str(bb.data_dir / "cifar-10-batches-py" / "test_batch") in line, line
    assert not marker.exists() and not out.exists()


def test_hostile_cifar_via_dataset_path_is_refused(bb, tmp_path, script):
    evil = tmp_path / "evil"
    shutil.copytree(bb.data_dir, evil)
    marker = tmp_path / "MARKER"
    write_hostile_cifar(evil / "cifar-10-batches-py", marker)
    out = tmp_path / "out"
    result = script("visual_cm.py", "--result_file_attack", bb.record_dir, "--dataset_path", evil,
                    "--output_dir", out, "--quiet", "--device", "cpu", cwd=tmp_path)
    line = one_error_line(result)
    assert "posix.system" in line and "test_batch" in line, line
    assert not marker.exists() and not out.exists()


def test_hostile_cifar_meta_is_refused_by_name(bb, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bb.data_dir, data)
    marker = tmp_path / "MARKER"
    write_hostile_cifar(data / "cifar-10-batches-py", marker, names=("batches.meta",))
    with pytest.raises(UserError, match=r"batches\.meta.*posix\.system"):
        open_clean_dataset("cifar10", data, False)
    assert not marker.exists()


def test_protocol_0_instance_opcode_is_refused(tmp_path):
    """INST (protocol 0) imports through the same door as GLOBAL: refused by name too."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "test_batch"
    path.write_bytes(b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    with pytest.raises(UserError, match=r"os\.system"):
        restricted_unpickle(path, "cifar10 file")
    assert not marker.exists()


def test_codecs_encode_only_undoes_latin1(tmp_path):
    """Python 3 writes bytes at protocol 2 as _codecs.encode(text, 'latin1'); other codecs are not data."""
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": b"\x00\xff"}, protocol=2))
    assert restricted_unpickle(path, "cifar10 file") == {"data": b"\x00\xff"}
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UserError, match="latin1"):
        restricted_unpickle(path, "cifar10 file")


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_arrays_of_every_protocol_unpickle(tmp_path, protocol):
    """Protocol 5 writes arrays through numpy's _frombuffer, earlier ones through _reconstruct."""
    written = {"data": np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072) % 251, "labels": [3, 7],
               "empty": np.array([], np.float32), "names": ["a", b"b"]}
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(written, protocol=protocol))
    loaded = restricted_unpickle(path, "cifar10 file")
    assert np.array_equal(loaded["data"], written["data"]) and loaded["data"].dtype == np.uint8
    assert loaded["labels"] == [3, 7] and loaded["names"] == ["a", b"b"] and loaded["empty"].shape == (0,)


# --- 2. records: harmless numpy content loads, hostile content is refused with the risk -------------

def test_record_with_empty_arrays_loads_without_trust(tmp_path):
    bb = make_bb_root(tmp_path, n_train=20, n_test=12, target=0)
    raw = load_raw(bb.record_dir / "attack_result.pt")
    raw["bd_test"]["original_index_array"] = np.array([], dtype=np.int64)
    raw["empty_float"] = np.array([])
    raw["empty_grid"] = np.zeros((0, 3), np.uint8)
    torch.save(raw, bb.record_dir / "attack_result.pt")
    record = load_record(str(bb.record_dir))
    assert record.bd_test.original_index_array.shape == (0,)
    loaded = safe_torch_load(bb.record_dir / "attack_result.pt")
    assert loaded["empty_float"].dtype == np.float64 and loaded["empty_grid"].shape == (0, 3)


DTYPES = ("float16", "float32", "float64", "uint8", "uint16", "int8", "int16", "int32", "int64", "bool",
          "complex64")


def test_every_standard_dtype_and_numpy_scalar_key_loads(tmp_path):
    rng = np.random.default_rng(0)
    written = {name: (rng.normal(size=(2, 3)) * 50).astype(name) for name in DTYPES}
    written["empty_int32"] = np.array([], np.int32)
    written["big_endian"] = np.arange(4, dtype=">i4")
    written["keys"] = {np.int64(7): "a", np.int32(3): "b", np.float64(0.5): "c", np.bool_(True): "d"}
    written["scalars"] = [np.float32(1.5), np.uint8(200), np.int64(-3)]
    path = tmp_path / "attack_result.pt"
    torch.save(written, path)
    loaded = safe_torch_load(path)
    for name in DTYPES + ("empty_int32",):
        assert loaded[name].dtype == written[name].dtype and np.array_equal(loaded[name], written[name]), name
    assert loaded["big_endian"].tolist() == [0, 1, 2, 3]
    assert loaded["keys"] == {7: "a", 3: "b", 0.5: "c", True: "d"}
    assert [type(v) for v in loaded["scalars"]] == [np.float32, np.uint8, np.int64]


def test_object_arrays_are_refused_by_name(tmp_path):
    path = tmp_path / "attack_result.pt"
    torch.save({"model": {}, "odd": np.array([1, "a"], dtype=object)}, path)
    with pytest.raises(UserError, match=f"ObjectDType.*{RISK}"):
        safe_torch_load(path)


def test_hostile_record_names_the_global_and_the_risk(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "attack_result.pt"
    torch.save({"model": {}, "evil": Hostile(marker)}, path)
    with pytest.raises(UserError, match=f"posix\\.system.*--trust_record {RISK}; use it only for files you trust"):
        safe_torch_load(path)
    assert not marker.exists()


def test_trust_record_prints_one_warning_line(bb, tmp_path, script):
    defense = tmp_path / "defense" / "ft"
    defense.mkdir(parents=True)
    model = load_raw(bb.record_dir / "attack_result.pt")["model"]
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": model}, defense / "defense_result.pt")
    result = script("visual_metric.py", "--result_file_attack", bb.record_dir, "--result_file_defense", defense,
                    "--trust_record", "--output_dir", tmp_path / "out", "--quiet", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--trust_record" in lines[0] and RISK in lines[0], result.stderr


# --- 3. info.pickle of a clean prototype ----------------------------------------------------------

def prototype_with_info(tmp_path, write_info):
    bb = make_bb_root(tmp_path / "bb", n_train=20, n_test=12)
    folder = write_prototype(bb.root, "proto", load_raw(bb.record_dir / "attack_result.pt")["model"], "cifar10",
                             (32, 32), 3, 10)
    write_info(folder / "info.pickle")
    return bb, folder


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_hostile_info_pickle_is_refused_even_with_dataset_and_model(tmp_path, writer):
    marker = tmp_path / "MARKER"
    content = {"dataset": "cifar10", "model": "preactresnet18", "evil": Hostile(marker)}

    def write(path):
        if writer == "torch.save":
            torch.save(content, path)
        else:
            path.write_bytes(pickle.dumps(content))

    _, folder = prototype_with_info(tmp_path, write)
    for flags in ({}, {"dataset": "cifar10", "model_name": "preactresnet18"}):
        with pytest.raises(UserError, match=r"info\.pickle.*posix\.system"):
            load_record(str(folder), **flags)
    assert not marker.exists()


def test_hostile_info_pickle_script_says_what_was_refused(tmp_path, script):
    marker = tmp_path / "MARKER"
    bb, folder = prototype_with_info(
        tmp_path, lambda path: path.write_bytes(pickle.dumps({"dataset": "cifar10", "x": Hostile(marker)})))
    result = script("visual_cm.py", "--result_file_attack", folder, "--dataset", "cifar10", "--model",
                    "preactresnet18", "--dataset_path", bb.data_dir, "--output_dir", tmp_path / "out", "--quiet",
                    "--device", "cpu", cwd=tmp_path)
    line = one_error_line(result)
    assert str(folder / "info.pickle") in line and "posix.system" in line, line
    assert not marker.exists()


def test_plain_pickle_info_loads(tmp_path):
    info = {"dataset": "cifar10", "model": "preactresnet18", "num_classes": 10, "img_size": (32, 32, 3)}
    _, folder = prototype_with_info(tmp_path, lambda path: path.write_bytes(pickle.dumps(info)))
    record = load_record(str(folder))
    assert (record.dataset, record.model_name, record.num_classes, record.img_size) == (
        "cifar10", "preactresnet18", 10, (32, 32, 3))


def test_malformed_info_pickle_image_size_is_one_line(tmp_path):
    info = {"dataset": "cifar10", "model": "preactresnet18", "img_size": 32}
    _, folder = prototype_with_info(tmp_path, lambda path: torch.save(info, path))
    with pytest.raises(UserError, match=r"info\.pickle: 'img_size' is 32"):
        load_record(str(folder))


# --- 5. malformed records: one line naming the file or key ----------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_bb_root(tmp_path_factory.mktemp("base"), n_train=20, n_test=12)


def altered_record(base, tmp_path, change) -> str:
    folder = tmp_path / "record" / "r"
    shutil.copytree(base.record_dir, folder)
    raw = load_raw(folder / "attack_result.pt")
    change(raw)
    torch.save(raw, folder / "attack_result.pt")
    return str(folder)


def set_key(key, value):
    return lambda raw: raw.__setitem__(key, value)


MALFORMED = {
    "model is a list": (set_key("model", [1, 2, 3]), r"'model' holds a list, not a state_dict"),
    "model is a string": (set_key("model", "weights"), r"'model' holds a str, not a state_dict"),
    "model holds non-tensors": (set_key("model", {"conv1.weight": "x"}), r"'model'.*conv1\.weight"),
    "num_classes not a number": (set_key("num_classes", "ten"), r"'num_classes' is 'ten'"),
    "num_classes zero": (set_key("num_classes", 0), r"'num_classes' is 0"),
    "img_size zero": (set_key("img_size", (0, 0, 3)), r"'img_size' is \(0, 0, 3\)"),
    "img_size words": (set_key("img_size", ("tall", "wide")), r"'img_size' is \('tall', 'wide'\)"),
    "img_size one number": (set_key("img_size", 32), r"'img_size' is 32"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_record_is_one_line_naming_the_key(base, tmp_path, case):
    change, message = MALFORMED[case]
    folder = altered_record(base, tmp_path, change)
    line = refusal(["--result_file_attack", folder, "--dataset_path", base.data_dir], tmp_path / "out")
    assert "attack_result.pt" in line, line
    assert re.search(message, line), line


def cifar_folder(tmp_path, n_train, n_test, classes=10):
    train_labels, test_labels = np.arange(n_train) % classes, np.arange(n_test) % classes
    write_cifar10(tmp_path, class_images(train_labels, (32, 32), 3, 0), train_labels,
                  class_images(test_labels, (32, 32), 3, 1), test_labels)
    return tmp_path


def test_record_indexing_past_the_dataset_is_one_line(base, tmp_path):
    small = cifar_folder(tmp_path / "small", 20, 6)
    line = refusal(["--result_file_attack", base.record_dir, "--dataset_path", small, "--visual_dataset", "bd_test"],
                   tmp_path / "out")
    assert "bd_test" in line and "12" in line and "6 samples" in line and "--dataset_path" in line, line


def test_poison_indicator_longer_or_shorter_than_the_dataset_is_one_line(base, tmp_path):
    large = cifar_folder(tmp_path / "large", 25, 12)
    line = refusal(["--result_file_attack", base.record_dir, "--dataset_path", large, "--visual_dataset",
                    "bd_train"], tmp_path / "out")
    assert "bd_train" in line and "poison_indicator" in line and "20" in line and "25" in line, line


def test_dataset_labels_beyond_the_models_classes_are_one_line(tmp_path):
    five = make_bb_root(tmp_path / "five", n_train=20, n_test=12, num_classes=5)
    ten = cifar_folder(tmp_path / "ten", 20, 12)
    line = refusal(["--result_file_attack", five.record_dir, "--dataset_path", ten], tmp_path / "out")
    assert "label 5" in line and "0..4" in line and "--dataset_path" in line, line


def test_dangling_attack_result_symlink_says_where_it_points(base, tmp_path):
    folder = tmp_path / "record" / "r"
    shutil.copytree(base.record_dir, folder)
    (folder / "attack_result.pt").unlink()
    target = tmp_path / "moved" / "attack_result.pt"
    (folder / "attack_result.pt").symlink_to(target)
    for location in (folder, folder / "attack_result.pt"):
        line = refusal(["--result_file_attack", location, "--dataset_path", base.data_dir], tmp_path / "out")
        assert "dangling symlink" in line and str(target) in line, line
