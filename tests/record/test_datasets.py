"""Each clean-dataset reader against the arrays the fixture wrote, and broken dataset files.

The expected arrays are the ones handed to the fixture writers, reordered by hand the way
BackdoorBench (and torchvision) enumerate the files; broken files must end a script with one
line naming the file and exit code 2.
"""
import gzip
import pickle
import shutil

import numpy as np
import pytest

from tests.bb_fixture import (CIFAR100_NAMES, CIFAR_KEY_KINDS, CIFAR_NAMES, MNIST_LAYOUTS, class_images,
                              make_bb_root, write_celeba, write_cifar10, write_cifar100, write_gtsrb, write_mnist,
                              write_tiny)
from backdoor_lens.record.datasets import open_clean_dataset
from tests.helpers import refusal as stop_with_one_line


def written(n: int, classes: int, size=(32, 32), channels: int = 3, seed: int = 0):
    """Labels cycling through the classes in a shuffled order, and their images."""
    labels = np.random.default_rng(seed).permutation(np.arange(n) % classes)
    return labels, class_images(labels, size, channels, seed)


def served(data) -> np.ndarray:
    return np.stack([data.image(i) for i in range(len(data))])


# --- every reader returns exactly what was written ------------------------------------------------

@pytest.mark.parametrize("keys", CIFAR_KEY_KINDS)
def test_cifar10_reads_bytes_str_and_python2_keys(tmp_path, keys):
    train_labels, train_images = written(23, 10, seed=1)
    test_labels, test_images = written(11, 10, seed=2)
    write_cifar10(tmp_path, train_images, train_labels, test_images, test_labels, keys=keys)
    train = open_clean_dataset("cifar10", tmp_path, True)
    test = open_clean_dataset("cifar10", tmp_path, False)
    np.testing.assert_array_equal(served(train), train_images)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(served(test), test_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert list(test.class_names) == CIFAR_NAMES


@pytest.mark.parametrize("keys", CIFAR_KEY_KINDS)
def test_cifar100_reads_fine_labels_with_every_key_kind(tmp_path, keys):
    train_labels, train_images = written(130, 100, seed=3)
    test_labels, test_images = written(17, 100, seed=4)
    write_cifar100(tmp_path, train_images, train_labels, test_images, test_labels, keys=keys)
    train = open_clean_dataset("cifar100", tmp_path, True)
    test = open_clean_dataset("cifar100", tmp_path, False)
    np.testing.assert_array_equal(served(train), train_images)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(served(test), test_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    assert list(train.class_names) == CIFAR100_NAMES


@pytest.mark.parametrize("layout", MNIST_LAYOUTS)
def test_mnist_reads_raw_gz_and_processed_files(tmp_path, layout):
    train_labels, train_images = written(19, 10, (28, 28), 1, seed=5)
    test_labels, test_images = written(9, 10, (28, 28), 1, seed=6)
    write_mnist(tmp_path, train_images, train_labels, test_images, test_labels, layout=layout)
    for train, images, labels in ((True, train_images, train_labels), (False, test_images, test_labels)):
        data = open_clean_dataset("mnist", tmp_path, train)
        np.testing.assert_array_equal(served(data), images)
        np.testing.assert_array_equal(data.labels, labels)


@pytest.mark.parametrize("layout", ["backdoorbench", "folders"])
def test_gtsrb_enumerates_classes_in_numeric_order(tmp_path, layout):
    """BackdoorBench's GTSRB reads class 0..42 in turn, each class's files in order: classes 2 and
    10 must not swap places as they would in a name sort."""
    train_labels, train_images = written(26, 13, seed=7)
    test_labels, test_images = written(8, 13, seed=8)
    write_gtsrb(tmp_path, train_images, train_labels, test_images, test_labels, layout=layout)
    order = np.argsort(train_labels, kind="stable")
    train = open_clean_dataset("gtsrb", tmp_path, True)
    np.testing.assert_array_equal(train.labels, train_labels[order])
    np.testing.assert_array_equal(served(train), train_images[order])
    test = open_clean_dataset("gtsrb", tmp_path, False)
    np.testing.assert_array_equal(test.labels, test_labels)
    np.testing.assert_array_equal(served(test), test_images)


def test_gtsrb_reads_the_older_images_subfolders(tmp_path):
    """Earlier BackdoorBench versions kept the same files under Train/Images/ and Test/Images/."""
    train_labels, train_images = written(6, 3, seed=9)
    test_labels, test_images = written(4, 3, seed=10)
    write_gtsrb(tmp_path / "flat", train_images, train_labels, test_images, test_labels)
    for part in ("Train", "Test"):
        (tmp_path / "old" / part).mkdir(parents=True)
        shutil.copytree(tmp_path / "flat" / part, tmp_path / "old" / part / "Images")
    shutil.move(tmp_path / "old" / "Test" / "Images" / "GT-final_test.csv", tmp_path / "old" / "Test")
    order = np.argsort(train_labels, kind="stable")
    np.testing.assert_array_equal(served(open_clean_dataset("gtsrb", tmp_path / "old", True)), train_images[order])
    np.testing.assert_array_equal(served(open_clean_dataset("gtsrb", tmp_path / "old", False)), test_images)


def test_celeba_labels_come_from_three_attributes_in_partition_order(tmp_path):
    train_labels, train_images = written(12, 8, (64, 64), seed=11)
    test_labels, test_images = written(9, 8, (64, 64), seed=12)
    write_celeba(tmp_path, train_images, train_labels, test_images, test_labels)
    train = open_clean_dataset("celeba", tmp_path, True)
    test = open_clean_dataset("celeba", tmp_path, False)
    np.testing.assert_array_equal(train.labels, train_labels)
    np.testing.assert_array_equal(served(train), train_images)
    np.testing.assert_array_equal(test.labels, test_labels)
    np.testing.assert_array_equal(served(test), test_images)


def test_tiny_orders_each_class_by_image_number(tmp_path):
    """BackdoorBench lists train/<wnid>/images/<wnid>_0.JPEG, _1, ..., _499: _10 comes after _9."""
    train_labels, train_images = written(36, 3, (64, 64), seed=13)
    test_labels, test_images = written(5, 3, (64, 64), seed=14)
    write_tiny(tmp_path, train_images, train_labels, test_images, test_labels, 3)
    order = np.argsort(train_labels, kind="stable")
    train = open_clean_dataset("tiny", tmp_path, True)
    np.testing.assert_array_equal(train.labels, train_labels[order])
    np.testing.assert_array_equal(served(train), train_images[order])
    test = open_clean_dataset("tiny", tmp_path, False)
    np.testing.assert_array_equal(served(test), test_images)
    assert list(test.class_names) == ["thing 0", "thing 1", "thing 2"]


# --- broken dataset files: one line naming the file, exit code 2 ----------------------------------

@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One miniature BackdoorBench checkout per dataset layout (never modified: cases copy the data)."""
    return {name: make_bb_root(tmp_path_factory.mktemp(name), dataset=name, n_train=20, n_test=12)
            for name in ("cifar10", "mnist", "gtsrb", "celeba", "tiny")}


def refusal(argv, out) -> str:
    """backdoor-lens cm in this process: exit code 2, one line on stderr, nothing written."""
    return stop_with_one_line("cm", argv, out)

def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def cifar_batch(path, changes: dict):
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    batch.update(changes)
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)


def replace_line(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


MNIST_RAW = "MNIST/raw"
BROKEN = {
    # name: (dataset, file under the data folder, how to break it, split that reads it)
    "cifar truncated batch": ("cifar10", "cifar-10-batches-py/test_batch", truncate, "clean_test"),
    "cifar text in place of a batch": ("cifar10", "cifar-10-batches-py/data_batch_3",
                                       lambda p: p.write_text("these are not the images\n"), "clean_train"),
    "cifar rows of the wrong length": ("cifar10", "cifar-10-batches-py/test_batch",
                                       lambda p: cifar_batch(p, {b"data": np.zeros((12, 3000), np.uint8)}),
                                       "clean_test"),
    "cifar labels and data disagree": ("cifar10", "cifar-10-batches-py/test_batch",
                                       lambda p: cifar_batch(p, {b"labels": [0] * 7}), "clean_test"),
    "cifar batch without data": ("cifar10", "cifar-10-batches-py/test_batch",
                                 lambda p: p.write_bytes(pickle.dumps({b"labels": [1, 2]})), "clean_test"),
    "cifar batch not a dict": ("cifar10", "cifar-10-batches-py/test_batch",
                               lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "clean_test"),
    "cifar meta not a dict": ("cifar10", "cifar-10-batches-py/batches.meta",
                              lambda p: p.write_bytes(pickle.dumps("airplane")), "clean_test"),
    "mnist truncated idx": ("mnist", f"{MNIST_RAW}/t10k-images-idx3-ubyte", truncate, "clean_test"),
    "mnist text in place of idx": ("mnist", f"{MNIST_RAW}/t10k-labels-idx1-ubyte",
                                   lambda p: p.write_text("0 1 2 3 4 5 6 7 8 9\n"), "clean_test"),
    "mnist labels and images disagree": ("mnist", f"{MNIST_RAW}/train-labels-idx1-ubyte",
                                         lambda p: p.write_bytes(p.read_bytes()[:4] + (5).to_bytes(4, "big")
                                                                 + bytes(5)), "clean_train"),
    "gtsrb csv without ClassId": ("gtsrb", "Test/GT-final_test.csv",
                                  lambda p: replace_line(p, ";ClassId", ";Label"), "clean_test"),
    "gtsrb short csv row": ("gtsrb", "Train/00003/GT-00003.csv",
                            lambda p: p.write_text(p.read_text().splitlines()[0] + "\n00003_00000.ppm;32\n"),
                            "clean_train"),
    "gtsrb image not an image": ("gtsrb", "Test/00004.ppm", lambda p: p.write_text("not an image"), "clean_test"),
    "celeba attribute column missing": ("celeba", "celeba/list_attr_celeba.txt",
                                        lambda p: replace_line(p, "Smiling", "Grinning"), "clean_test"),
    "celeba file without attributes": ("celeba", "celeba/list_eval_partition.txt",
                                       lambda p: p.write_text(p.read_text() + "999999.jpg 2\n"), "clean_test"),
    "tiny unknown class in val": ("tiny", "tiny-imagenet-200/val/val_annotations.txt",
                                  lambda p: replace_line(p, "\tn00000", "\tn99999"), "clean_test"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_dataset_file_is_one_line_naming_it(roots, tmp_path, case):
    dataset, name, breaker, split = BROKEN[case]
    bb = roots[dataset]
    data = tmp_path / "data"
    shutil.copytree(bb.data_dir, data)
    breaker(data / name)
    line = refusal(["--result_file_attack", bb.record_dir, "--dataset_path", data, "--visual_dataset", split],
                   tmp_path / "out")
    assert str(data / name) in line, line


def test_truncated_mnist_gz_is_one_line_naming_it(roots, tmp_path):
    bb = roots["mnist"]
    data = tmp_path / "data"
    shutil.copytree(bb.data_dir, data)
    raw = data / MNIST_RAW
    for path in list(raw.iterdir()):
        (raw / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    truncate(raw / "t10k-images-idx3-ubyte.gz")
    line = refusal(["--result_file_attack", bb.record_dir, "--dataset_path", data], tmp_path / "out")
    assert str(raw / "t10k-images-idx3-ubyte.gz") in line, line
