"""The foundation reads every record kind: prototypes, no bd_train, defenses, grayscale, 200 classes."""
import numpy as np
import pytest

from tests.bb_fixture import RECORD_KINDS, make_record_kind
from backdoor_lens.args import make_args
from backdoor_lens.context import load_context
from backdoor_lens.errors import UserError


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return {kind: make_record_kind(tmp_path_factory.mktemp(kind), kind) for kind in RECORD_KINDS}


def context(flags, **kw):
    values = dict(zip([f[2:] for f in flags[::2]], flags[1::2]))
    values.update(kw)
    args = make_args(None, quiet=True, **values)
    return load_context(args, "probe")


@pytest.mark.parametrize("kind", RECORD_KINDS)
def test_every_kind_loads_and_serves_clean_test(kinds, kind):
    with context(kinds[kind]) as ctx:
        x = ctx.split[0][0]
        assert x.shape[0] == (1 if kind == "mnist" else 3)
        out = ctx.model(ctx.split.batch([0, 1])[0].to(ctx.device))
        assert out.shape == (2, 200 if kind == "tiny200" else 10)
        assert len(ctx.class_names) == ctx.num_classes
        assert ("defense" in ctx.models) == kind.startswith("defense")


def test_prototype_is_recognised_without_the_flag(kinds):
    with context(kinds["prototype"]) as ctx:
        assert ctx.record.kind == "prototype" and ctx.record.bd_train is None and ctx.record.bd_test is None
    with pytest.raises(UserError, match="needs poisoned"):
        context(kinds["prototype"], visual_dataset="bd_train")


def test_no_bd_train_serves_bd_test_but_refuses_bd_train(kinds):
    with context(kinds["no_bd_train"], visual_dataset="bd_test") as ctx:
        assert ctx.split.poison.all()
    with pytest.raises(UserError, match="bd_train"):
        context(kinds["no_bd_train"], visual_dataset="bd_train")


def test_pruned_defense_applies_the_mask(kinds):
    import torch
    with context(kinds["defense_pruned"]) as ctx:
        weight = ctx.models["defense"].linear.weight
        zero_rows = (weight.abs().sum(1) == 0).sum().item()
        assert zero_rows == weight.shape[0] // 4
        assert not torch.equal(weight, ctx.models["attack"].linear.weight)


def test_clp_defense_keeps_zeroed_channels(kinds):
    with context(kinds["defense_clp"]) as ctx:
        w = ctx.models["defense"].layer4[1].conv2.weight
        assert np.isclose(w[:32].abs().sum().item(), 0.0) and w[32:].abs().sum().item() > 0


def test_tiny_has_200_class_names(kinds):
    with context(kinds["tiny200"]) as ctx:
        assert ctx.class_names[3] == "thing 3" and ctx.record.img_size == (64, 64, 3)
