"""The data path: batches assembled from images decoded once equal each image decoded and normalised by hand."""
import numpy as np
import pytest
import torch
from PIL import Image

from backdoor_lens.record import splits as splits_module
from backdoor_lens.record.datasets import dataset_info, open_clean_dataset
from backdoor_lens.record.images import Batches
from backdoor_lens.record.record import load_record
from backdoor_lens.record.splits import ImageTransform, build_split, new_store
from tests.bb_fixture import make_bb_root


def by_hand(image_uint8: np.ndarray, mean, std, channels: int) -> np.ndarray:
    """ToTensor then Normalize of one H x W x C image, in numpy (float32 like torchvision)."""
    x = image_uint8.astype(np.float32) / np.float32(255.0)
    if x.shape[2] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=2)
    mean = np.asarray(mean, np.float32) if len(mean) == channels else np.full(channels, mean[0], np.float32)
    std = np.asarray(std, np.float32) if len(std) == channels else np.full(channels, std[0], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def expected_image(bb, split, position) -> np.ndarray:
    """The sample's uint8 image read straight from disk: its PNG when poisoned, else the dataset file."""
    if split.poison[position]:
        assert str(split.paths[position]).startswith(str(bb.record_dir))
        image = np.asarray(Image.open(split.paths[position]))
    else:
        image = np.asarray(split.clean.image(int(split.indices[position])))
    return image if image.ndim == 3 else image[..., None]


def record_parts(bb, dataset):
    record = load_record(str(bb.record_dir))
    info = dataset_info(dataset)
    transform = ImageTransform(tuple(record.img_size[:2]), 3, info.mean, info.std)
    return record, info, transform


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "gtsrb"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_equal_each_image_normalised_by_hand(tmp_path, dataset, shuffle):
    bb = make_bb_root(tmp_path, dataset=dataset, n_train=50, n_test=20)
    record, info, transform = record_parts(bb, dataset)
    train = open_clean_dataset(dataset, bb.data_dir, True)
    split = build_split("bd_train", record, train, None, transform)
    seen = []
    for x, label, original, poison, index in Batches(split, 16, "cpu", shuffle=shuffle, seed=3):
        assert x.shape[1:] == (3,) + tuple(record.img_size[:2]) and x.dtype == torch.float32
        for row in range(len(index)):
            position = int(index[row])  # bd_train serves the whole training set in order
            want = by_hand(expected_image(bb, split, position), info.mean, info.std, 3)
            assert np.allclose(x[row].numpy(), want, atol=1e-6, rtol=0)
            assert (int(label[row]), int(original[row]), int(poison[row])) == \
                (split.labels[position], split.original_labels[position], int(split.poison[position]))
            seen.append(position)
    assert sorted(seen) == list(range(len(split)))
    assert (seen != sorted(seen)) == shuffle and split.poison.sum() == len(bb.train_poison)


def test_pixels_and_clean_twins_are_served_by_hand(bb):
    record, info, transform = record_parts(bb, "cifar10")
    test = open_clean_dataset("cifar10", bb.data_dir, False)
    poisoned = build_split("bd_test", record, None, test, transform).pixels()
    twin = poisoned.clean_twin()
    (xp, *_), (xc, *_) = next(iter(Batches(poisoned, 64, "cpu"))), next(iter(Batches(twin, 64, "cpu")))
    for row in range(len(poisoned)):
        png = expected_image(bb, poisoned, row)
        assert np.allclose(xp[row].numpy(), png.transpose(2, 0, 1) / np.float32(255), atol=1e-7)
        clean = test.image(int(poisoned.indices[row]))
        assert np.allclose(xc[row].numpy(), clean.transpose(2, 0, 1) / np.float32(255), atol=1e-7)
    assert not np.array_equal(xp.numpy(), xc.numpy())


def test_each_poisoned_png_is_decoded_once_per_store(bb, monkeypatch):
    """Two splits over the same PNGs (bd_train and its subset), two passes each: one decode per file."""
    record, info, transform = record_parts(bb, "cifar10")
    train = open_clean_dataset("cifar10", bb.data_dir, True)
    reads = []
    real = splits_module.read_poisoned_image
    monkeypatch.setattr(splits_module, "read_poisoned_image", lambda path, size: reads.append(path) or real(path, size))
    store = new_store(transform, tuple(record.img_size))
    full = build_split("bd_train", record, train, None, transform, store=store)
    part = build_split("bd_train", record, train, None, transform, store=store, n_sub=20, seed=1)
    for split in (full, part, full, part):
        for _ in Batches(split, 7, "cpu"):
            pass
    assert sorted(map(str, reads)) == sorted({str(p) for p in full.paths if p is not None})
    assert len(reads) == len(bb.train_poison)


def test_folder_dataset_over_the_budget_is_decoded_per_batch_with_the_same_pixels(tmp_path, monkeypatch):
    bb = make_bb_root(tmp_path, dataset="gtsrb", n_train=30, n_test=12)
    record, info, transform = record_parts(bb, "gtsrb")
    test = open_clean_dataset("gtsrb", bb.data_dir, False)
    cached = build_split("clean_test", record, None, test, transform)
    monkeypatch.setenv("BACKDOOR_LENS_DECODE_MB", "0")
    uncached = build_split("clean_test", record, None, test, transform)
    a = torch.cat([b[0] for b in Batches(cached, 5, "cpu")])
    b = torch.cat([b[0] for b in Batches(uncached, 5, "cpu")])
    assert torch.equal(a, b)
    for row in range(len(test)):
        assert np.allclose(a[row].numpy(), by_hand(test.image(row), info.mean, info.std, 3), atol=1e-6)


def test_shuffled_order_is_a_seeded_permutation(bb):
    record, info, transform = record_parts(bb, "cifar10")
    split = build_split("clean_test", record, None, open_clean_dataset("cifar10", bb.data_dir, False), transform)
    order = lambda seed: torch.cat([b[4] for b in Batches(split, 8, "cpu", shuffle=True, seed=seed)]).tolist()  # noqa: E731
    assert order(5) == order(5) and order(5) != order(6)
    assert sorted(order(5)) == list(range(len(split)))


def test_images_first_decoded_under_inference_mode_serve_a_later_gradient(tmp_path):
    """A folder dataset first read inside inference_mode (a forward pass) must serve later batches
    that need gradients (an attribution) and decode new images into the same store."""
    bb = make_bb_root(tmp_path, dataset="gtsrb", n_train=30, n_test=12)
    record, info, transform = record_parts(bb, "gtsrb")
    split = build_split("clean_test", record, None, open_clean_dataset("gtsrb", bb.data_dir, False), transform)
    with torch.inference_mode():
        first = split.batch([0, 1])[0]
    x = split.batch([0, 1, 2])[0].requires_grad_(True)  # image 2 is new: decoded into the same tensor
    (x * 2).sum().backward()
    assert torch.equal(x.detach()[:2], first) and torch.equal(x.grad, torch.full_like(x, 2.0))
