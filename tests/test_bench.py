"""The benchmarks' own parts (no timing is checked): the synthetic CIFAR-10 record and data they
build, and the parsing and comparison bench_suite.py relies on."""
import pickle

import numpy as np
import pytest

from backdoor_lens.record.datasets import open_clean_dataset
from backdoor_lens.record.record import load_record
from backdoor_lens.record.splits import build_split, ImageTransform
from bench import bench_suite, synthetic_cifar


def test_cifar_layout_rows_are_channel_planes(tmp_path):
    """Each row of 'data' is the red plane, then the green, then the blue, each row by row, as the
    official files are; the toolkit's reader gives back the images and labels written."""
    rng = np.random.default_rng(3)
    train = (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 10)
    test = (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([3, 1, 4, 1]))
    base = synthetic_cifar.write_cifar10(tmp_path, train, test)
    with open(base / "test_batch", "rb") as handle:
        batch = pickle.load(handle)
    image = test[0][2]
    planes = [image[row, col, channel] for channel in range(3) for row in range(32) for col in range(32)]
    assert batch["data"][2].tolist() == planes
    assert batch["labels"] == [3, 1, 4, 1]
    read_train = open_clean_dataset("cifar10", tmp_path, True)
    assert np.array_equal(read_train._array, train[0]) and read_train.labels.tolist() == list(range(10)) + [0, 1]
    assert read_train.class_names == synthetic_cifar.LABEL_NAMES


def test_synthetic_record_is_badnets_on_ten_percent(tmp_path):
    """A miniature build: 10% of the training samples poisoned, all non-target, served with target 0
    and the clean image under a white 3x3 square one pixel from the bottom-right corner; bd_test holds
    every non-target test image so stamped; the data are found from the record's data_path."""
    out = tmp_path / "record" / "mini"
    built = synthetic_cifar.build(out, train_images=8, epochs=1, eval_images=10, n_train=40, n_test=20, quiet=True,
                                  device="cpu")
    assert synthetic_cifar.cached(out) == built
    record = load_record(str(out))
    root = record.dataset_root(None)
    assert root.resolve() == (tmp_path / "record" / "mini_data").resolve()
    train, test = open_clean_dataset("cifar10", root, True), open_clean_dataset("cifar10", root, False)
    transform = ImageTransform(size=(32, 32), channels=3, mean=(0, 0, 0), std=(1, 1, 1))
    bd_train = build_split("bd_train", record, train, None, transform)
    assert bd_train.poison.sum() == 4 and (train.labels[bd_train.poison] != 0).all()
    assert (bd_train.labels[bd_train.poison] == 0).all()
    positions = np.flatnonzero(bd_train.poison)
    expected = train._array[positions].copy()
    expected[:, 28:31, 28:31, :] = 255
    assert np.array_equal(bd_train.images(positions).numpy(), expected)
    bd_test = build_split("bd_test", record, None, test, transform)
    assert bd_test.indices.tolist() == np.flatnonzero(test.labels != 0).tolist()
    stamped = test._array[bd_test.indices].copy()
    stamped[:, 28:31, 28:31, :] = 255
    assert np.array_equal(bd_test.images(np.arange(len(bd_test))).numpy(), stamped)


def test_suite_output_parsing():
    output = "\n".join(["==> cm: Confusion matrix", "    clean accuracy 0.98", "    ok in 3.4 s",
                        "==> landscape: Loss landscape", "    error: no", "    failed (exit 2) in 12.0 s",
                        "", "1 of 2 analyses ran"])
    assert bench_suite.parse_times(output) == {"cm": ("ok", 3.4), "landscape": ("failed (exit 2)", 12.0)}


@pytest.mark.parametrize("a, b, count", [
    ({"x": 1.0, "y": [1, 2]}, {"x": 1.0 + 1e-9, "y": [1, 2]}, 0),
    ({"x": 1.0}, {"x": 1.00001}, 1),
    ({"x": [0.5, 0.25], "s": "a"}, {"x": [0.5, 0.26], "s": "b"}, 2),
    ({"x": 1, "eval_seconds": 3.0, "ranks": 1}, {"x": 1, "eval_seconds": 9.0, "ranks": 2}, 0),
    ({"x": 1, "z": 2}, {"x": 1}, 1),
    ({"x": [1, 2]}, {"x": [1, 2, 3]}, 1),
    ({"x": True}, {"x": 1.0}, 1),
])
def test_summary_differences(a, b, count):
    assert len(bench_suite.differences(a, b)) == count


@pytest.mark.parametrize("analyses", ["tac,nope", ","])
def test_pipeline_refuses_unknown_analyses(analyses, capsys):
    """A misspelt --analyses stops before anything is loaded, naming the choices."""
    from bench import bench_pipeline

    with pytest.raises(SystemExit) as stopped:
        bench_pipeline.main(["--record", "demo", "--analyses", analyses])
    assert stopped.value.code == 2
    assert "choose from tac, na, act, actdist" in capsys.readouterr().err
