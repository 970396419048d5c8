"""Every split, served from the record's arrays; n_sub/c_sub; clean twins."""
import pickle

import numpy as np
import pytest
from PIL import Image

from backdoor_lens.record.datasets import open_clean_dataset
from backdoor_lens.errors import UserError
from backdoor_lens.record.record import load_record
from backdoor_lens.record.splits import ImageTransform, build_split, kept_classes

TRANSFORM = ImageTransform((32, 32), 3, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


@pytest.fixture(scope="module")
def parts(bb):
    record = load_record(str(bb.record_dir))
    return record, open_clean_dataset("cifar10", bb.data_dir, True), open_clean_dataset("cifar10", bb.data_dir, False)


def split(parts, name, **kw):
    record, train, test = parts
    return build_split(name, record, train, test, TRANSFORM, **kw)


def test_clean_splits(bb, parts):
    s = split(parts, "clean_train")
    assert len(s) == bb.n_train and not s.poison.any() and (s.labels == s.original_labels).all()
    assert len(split(parts, "clean_test")) == bb.n_test


def test_bd_train_serves_pngs_and_attack_labels(bb, parts):
    s = split(parts, "bd_train")
    assert len(s) == bb.n_train
    assert np.flatnonzero(s.poison).tolist() == bb.train_poison
    assert (s.labels[s.poison] == bb.target).all()
    assert (s.labels[~s.poison] == s.original_labels[~s.poison]).all()
    i = bb.train_poison[0]
    png = np.asarray(Image.open(bb.record_dir / "bd_train_dataset" / str(s.original_labels[i]) / f"{i}.png"))
    assert np.array_equal(s.image_uint8(i), png)
    x, label, original, flag, index = s[i]
    assert (label, flag, index) == (bb.target, 1, i) and x.shape == (3, 32, 32)


def test_bd_test_holds_only_poisoned_non_target(bb, parts):
    s = split(parts, "bd_test")
    assert s.indices.tolist() == bb.test_poison and s.poison.all()
    assert (s.original_labels != bb.target).all() and (s.labels == bb.target).all()


def cifar_test_arrays(bb):
    """The clean test set straight from the pickle, independent of backdoor_lens.record.datasets."""
    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(batch[b"labels"])


def test_mixed_is_backdoorbench_s(bb, parts):
    """BackdoorBench's generate_mix_dataset: the N clean test samples, int(N * pratio) of the non-target ones
    (those with a poisoned version) replaced by it. 0.29 * 40 = 11.6: BackdoorBench truncates to 11."""
    images, labels = cifar_test_arrays(bb)
    s = split(parts, "mixed", pratio=0.29, seed=3, target=bb.target)
    assert len(s) == bb.n_test and s.indices.tolist() == list(range(bb.n_test))  # no twins side by side
    assert s.poison.sum() == 11
    poisoned = np.flatnonzero(s.poison)
    assert set(poisoned) <= set(bb.test_poison) and (labels[poisoned] != bb.target).all()
    assert (s.labels[poisoned] == bb.target).all() and (s.original_labels == labels).all()
    assert (s.labels[~s.poison] == labels[~s.poison]).all()
    twin = s.clean_twin()
    for i in range(bb.n_test):
        assert np.array_equal(twin.image_uint8(i), images[i])
        if s.poison[i]:
            png = bb.record_dir / "bd_test_dataset" / str(labels[i]) / f"{i}.png"
            assert np.array_equal(s.image_uint8(i), np.asarray(Image.open(png)))
        else:
            assert np.array_equal(s.image_uint8(i), images[i])
    assert np.flatnonzero(split(parts, "mixed", pratio=0.29, seed=3).poison).tolist() == poisoned.tolist()
    assert np.flatnonzero(split(parts, "mixed", pratio=0.29, seed=4).poison).tolist() != poisoned.tolist()
    with pytest.raises(UserError, match=f"only {len(bb.test_poison)} non-target"):
        split(parts, "mixed", pratio=1.0)


def test_n_sub_is_stratified_and_c_sub_keeps_target(bb, parts):
    s = split(parts, "bd_train", n_sub=30)
    assert len(s) == 30
    assert abs(s.poison.sum() - 30 * len(bb.train_poison) / bb.n_train) <= 1
    assert kept_classes(10, 3, 7).tolist() == [0, 1, 7]
    c = split(parts, "bd_train", c_sub=1, target=7)
    assert set(np.unique(c.labels)) == {7}
    assert c.poison.sum() == 0  # poisoned samples carry label 0, not among the kept classes
    c0 = split(parts, "bd_train", c_sub=2, target=0)
    assert c0.poison.sum() == len(bb.train_poison)


def test_clean_twin_serves_the_same_indices_clean(bb, parts):
    s = split(parts, "bd_test")
    twin = s.clean_twin()
    assert (twin.indices == s.indices).all() and not twin.poison.any()
    clean = open_clean_dataset("cifar10", bb.data_dir, False)
    assert np.array_equal(twin.image_uint8(0), clean.image(int(s.indices[0])))
    assert s.poison.all()  # the original split is untouched


def test_subset_defaults_and_empty_filters(bb, parts):
    assert len(split(parts, "subset")) == bb.n_train
    with pytest.raises(UserError, match="at least 1"):
        split(parts, "clean_test", n_sub=0)
    with pytest.raises(UserError, match="unknown --visual_dataset"):
        split(parts, "everything")


def test_denormalize_inverts_normalize(bb, parts):
    s = split(parts, "clean_test")
    x = s[0][0]
    assert np.allclose(TRANSFORM.denormalize(x).numpy(), TRANSFORM.to_unit(s.image_uint8(0)).numpy(), atol=1e-6)
