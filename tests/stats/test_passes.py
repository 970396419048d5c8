"""Shared passes: one forward pass answers several requests with the numbers each would get alone."""
import numpy as np
import torch

from backdoor_lens.models import build_model
from backdoor_lens.record.datasets import dataset_info, open_clean_dataset
from backdoor_lens.record.images import Batches
from backdoor_lens.record.record import load_record
from backdoor_lens.record.splits import ImageTransform, build_split
from backdoor_lens.stats import passes
from backdoor_lens.stats.activations import TopKTracker, compare_twins, compute_top_activations
from backdoor_lens.stats.features import collect_features


def test_top_k_keeps_ties_in_sample_order_whatever_the_batch_size():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(53, 6)).astype(np.float32)  # few distinct values: many ties
    for k in (1, 5, 17):
        # The reference: per channel, positions sorted by (score descending, position ascending).
        want = np.stack([np.lexsort((np.arange(53), -scores[:, c]))[:k] for c in range(6)])
        for batch in (1, 4, 53):
            tracker = TopKTracker(k)
            for start in range(0, 53, batch):
                tracker.update(torch.from_numpy(scores[start:start + batch]), torch.arange(start, min(start + batch, 53)))
            assert np.array_equal(tracker.positions.numpy(), want)
            assert np.array_equal(tracker.values.numpy(), np.take_along_axis(scores.T, want, axis=1))


def setup(bb):
    record = load_record(str(bb.record_dir))
    info = dataset_info("cifar10")
    transform = ImageTransform((32, 32), 3, info.mean, info.std)
    train = open_clean_dataset("cifar10", bb.data_dir, True)
    split = build_split("bd_train", record, train, None, transform)
    model = build_model("preactresnet18", 10, 3)
    model.load_state_dict(record.state_dict)
    return model.eval(), split


def test_shared_passes_answer_later_requests_with_the_numbers_of_separate_passes(bb):
    model, split = setup(bb)
    poisoned = split.only_poisoned()
    loader = lambda s: Batches(s, 8, "cpu")  # noqa: E731
    layers_a, layers_b = ["layer2.0.conv1"], ["layer4.1.conv2", "linear"]
    alone_a = compare_twins({"m": model}, poisoned, loader, layers_a, "cpu")["m"]
    alone_b = compare_twins({"m": model}, poisoned, loader, layers_b, "cpu", per_unit=True)["m"]
    top_small = compute_top_activations(model, loader(split), layers_b, "cpu", 3)
    top_large = compute_top_activations(model, loader(split), layers_a, "cpu", 9)
    features = collect_features(model, loader(split), "layer4.1.conv2", "cpu", how="avg")
    passes.mark_weights(model, "attack", "test")
    with passes.sharing() as shared:
        first = compare_twins({"m": model}, poisoned, loader, layers_a, "cpu")["m"]
        second = compare_twins({"m": model}, poisoned, loader, layers_b, "cpu", per_unit=True)["m"]
        assert (shared.passes_run, shared.passes_saved) == (1, 1)
        large = compute_top_activations(model, loader(split), layers_a, "cpu", 9)
        small = compute_top_activations(model, loader(split), layers_b, "cpu", 3)
        assert (shared.passes_run, shared.passes_saved) == (2, 2)
        compute_top_activations(model, loader(split), layers_a, "cpu", 12)  # deeper than kept: a new pass
        assert shared.passes_run == 3
        again = [collect_features(model, loader(split), "layer4.1.conv2", "cpu", how="avg") for _ in range(2)]
        assert shared.passes_run == 4
    for alone, shared_result, layers in ((alone_a, first, layers_a), (alone_b, second, layers_b)):
        assert set(shared_result.tac) == set(layers)
        for name in layers:
            assert np.array_equal(alone.tac[name], shared_result.tac[name])
            assert np.array_equal(alone.poisoned_mean[name], shared_result.poisoned_mean[name])
    for name in layers_b:
        assert np.array_equal(alone_b.poisoned_unit_mean[name], second.poisoned_unit_mean[name])
    assert first.poisoned_unit_mean == {}
    for alone, kept, layers in ((top_small, small, layers_b), (top_large, large, layers_a)):
        assert alone.k == kept.k
        for name in layers:
            assert np.array_equal(alone.positions[name], kept.positions[name])
            assert np.array_equal(alone.values[name], kept.values[name])
    for got in again:
        for a, b in zip(features, got):
            assert np.array_equal(a, b)


def test_nothing_is_shared_for_unmarked_models_or_other_images(bb):
    model, split = setup(bb)
    with passes.sharing() as shared:
        compute_top_activations(model, Batches(split, 8, "cpu"), ["linear"], "cpu", 2)
        compute_top_activations(model, Batches(split, 8, "cpu"), ["linear"], "cpu", 2)
        assert (shared.passes_run, shared.passes_saved) == (0, 0)  # not marked: never kept
        passes.mark_weights(model, "attack", "test")
        compute_top_activations(model, Batches(split, 8, "cpu"), ["linear"], "cpu", 2)
        compute_top_activations(model, Batches(split, 16, "cpu"), ["linear"], "cpu", 2)  # other batches
        compute_top_activations(model, Batches(split.take(np.arange(10)), 8, "cpu"), ["linear"], "cpu", 2)
        compute_top_activations(model, Batches(split.pixels(), 8, "cpu"), ["linear"], "cpu", 2)
        assert (shared.passes_run, shared.passes_saved) == (4, 0)
