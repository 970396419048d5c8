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
    # Few distinct values (many ties), negative ones, and both zeros (-0.0 == 0.0 must tie);
    # 700 samples so that the tracker selects mid-stream, not only at the end.
    n = 700
    scores = rng.integers(-3, 4, size=(n, 6)).astype(np.float32) * rng.choice([0.5, 1.0], size=(n, 6)).astype(np.float32)
    scores[rng.random((n, 6)) < 0.1] = -0.0
    scores[:, 5] = rng.normal(size=n)  # one channel of distinct values
    for k in (1, 5, 17, 300, 650):  # 650: negative scores reach the lists
        # The reference: per channel, positions sorted by (score descending, position ascending).
        want = np.stack([np.lexsort((np.arange(n), -scores[:, c]))[:k] for c in range(6)])
        for batch in (1, 64, 299, n):
            tracker = TopKTracker(k)
            for start in range(0, n, batch):
                tracker.update(torch.from_numpy(scores[start:start + batch]), torch.arange(start, min(start + batch, n)))
            assert np.array_equal(tracker.positions.numpy(), want), (k, batch)
            assert np.array_equal(tracker.values.numpy(), np.take_along_axis(scores.T, want, axis=1)), (k, batch)


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
        # The first top-k request keeps lists as deep as the split's poisoned count (actdist's k),
        # whatever it asked for: that deep is answered from it, deeper needs a new pass.
        poisoned_count = int(split.poison.sum())
        assert 3 < poisoned_count < 9
        small = compute_top_activations(model, loader(split), layers_b, "cpu", 3)
        deepest = compute_top_activations(model, loader(split), layers_a, "cpu", poisoned_count)
        assert (shared.passes_run, shared.passes_saved) == (2, 2)
        large = compute_top_activations(model, loader(split), layers_a, "cpu", 9)
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
    top_deepest = compute_top_activations(model, loader(split), layers_a, "cpu", poisoned_count)
    for name in layers_a:
        assert np.array_equal(top_deepest.positions[name], deepest.positions[name])
        assert np.array_equal(top_deepest.values[name], deepest.values[name])
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


def test_one_split_pass_answers_predictions_top_k_and_the_detectors_features(bb):
    """Whichever asks first (cm's predictions, act's top-k, detect's features), the one pass over
    bd_train answers the others with the numbers of their own passes."""
    from backdoor_lens.analyses.detect import training_features
    from backdoor_lens.models.layers import penultimate_layer
    from backdoor_lens.stats.metrics import predict

    model, split = setup(bb)
    loader = lambda: Batches(split, 8, "cpu")  # noqa: E731
    last = penultimate_layer(model)
    alone_pred = predict(model, loader(), "cpu")
    alone_top = compute_top_activations(model, loader(), ["layer3.0.conv1", "linear"], "cpu", 4)
    alone_features = training_features(model, loader(), last, True, "avg", "cpu")
    # The independent reference for the features: the input of the last Linear layer, captured
    # by a hook of this test's own over one batch of all the images.
    captured = []
    handle = model.get_submodule(last).register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0].double()))
    with torch.inference_mode():
        x = torch.cat([batch[0] for batch in loader()])
        reference_logits = model(x)
    handle.remove()
    np.testing.assert_allclose(alone_features[0], captured[0].numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(alone_pred.pred, reference_logits.argmax(1).numpy())
    passes.mark_weights(model, "attack", "test")
    for first in ("predict", "top", "features"):
        with passes.sharing() as shared:
            asks = {"predict": lambda: predict(model, loader(), "cpu"),
                    "top": lambda: compute_top_activations(model, loader(), ["layer3.0.conv1", "linear"], "cpu", 4),
                    "features": lambda: training_features(model, loader(), last, True, "avg", "cpu")}
            got = {name: asks[name]() for name in [first] + [n for n in asks if n != first]}
            assert (shared.passes_run, shared.passes_saved) == (1, 2), first
        for field_name in ("pred", "labels", "original_labels", "poison", "indices", "confidence"):
            assert np.array_equal(getattr(alone_pred, field_name), getattr(got["predict"], field_name)), field_name
        for name in ("layer3.0.conv1", "linear"):
            assert np.array_equal(alone_top.positions[name], got["top"].positions[name])
            assert np.array_equal(alone_top.values[name], got["top"].values[name])
        assert np.array_equal(alone_features[0], got["features"][0]) and np.array_equal(alone_features[1], got["features"][1])


def test_kept_passes_stay_within_one_budget_for_all_of_them(bb):
    """Past the budget the oldest entries go; asking for one again makes its pass again, with the
    same numbers."""
    model, split = setup(bb)
    passes.mark_weights(model, "attack", "test")
    ask = lambda batch: compute_top_activations(model, Batches(split, batch, "cpu"), ["linear"], "cpu", 2)  # noqa: E731
    with passes.sharing() as roomy:
        first = ask(8)
        one_pass = roomy.kept_bytes  # the split pass's top-k lists and outputs
    # The independent size: the arrays and tensors this pass holds, counted here by hand.
    kept = {kind: entry[2] for (kind, _, _), entry in roomy.entries.items()}
    top, outputs = kept["top"], kept["outputs"]
    by_hand = sum(a.nbytes for a in top.values.values()) + sum(a.nbytes for a in top.positions.values())
    by_hand += sum(t.numel() * t.element_size() for t in outputs.logits + outputs.penultimate)
    by_hand += sum(t.numel() * t.element_size() for rest in outputs.rest for t in rest)
    assert one_pass == by_hand > 0
    with passes.sharing(budget_bytes=int(one_pass * 1.5)) as tight:
        ask(8)
        ask(16)  # another pass (other batches): the first one's entries make room for it
        assert tight.passes_run == 2 and tight.kept_bytes <= tight.budget_bytes
        again = ask(8)
        assert tight.passes_run == 3 and tight.kept_bytes <= tight.budget_bytes
    assert np.array_equal(first.positions["linear"], again.positions["linear"])
    with passes.sharing(budget_bytes=1) as small:  # entries larger than the whole budget: not kept
        ask(8)
        ask(8)
        assert (small.passes_run, small.kept_bytes) == (2, 0)
