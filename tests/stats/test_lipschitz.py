"""Channel Lipschitz bounds as CLP defines them, and as BackdoorBench's CLP defense computes them.

Every expected number is computed here: one numpy SVD per channel, the BN scale by its formula,
the conv -> BN pairs written out by reading the models' forward code, and BackdoorBench's
`CLP_prune` (defense/clp.py) re-typed as published.
"""
import copy
import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from tests.bb_fixture import make_bb_root
from backdoor_lens.errors import UserError
from backdoor_lens.stats.lipschitz import compute_channel_lipschitz
from backdoor_lens.models import PreActResNet18

RAW = "raw kernel norm, reaches no BN"


def svd_per_channel(weight: torch.Tensor) -> np.ndarray:
    w = weight.detach().double().numpy()
    return np.array([np.linalg.svd(w[c].reshape(w.shape[1], -1), compute_uv=False).max() for c in range(len(w))])


def randomise_norms(model: nn.Module, seed: int, eps: float = 0.05) -> nn.Module:
    """Random |gamma|, running variances and a large eps on every BN, so that a wrong BN or a
    forgotten eps changes the numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 2 + 0.05)
                module.eps = eps
    return model.eval()


def preact_reached_bn() -> dict:
    """The BN each conv's output reaches in PreActBlock.forward: conv1 -> bn2 of its block; conv2 and
    the shortcut are summed into the block's output, which the next block's bn1 takes first; the
    last block's sum goes to the pooling and the linear layer (no BN)."""
    reached = {"conv1": "layer1.0.bn1", "linear": None}
    for stage in range(1, 5):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            following = f"layer{stage}.1.bn1" if block == 0 else (f"layer{stage + 1}.0.bn1" if stage < 4 else None)
            reached[f"{prefix}.conv1"] = f"{prefix}.bn2"
            reached[f"{prefix}.conv2"] = following
            if stage > 1 and block == 0:
                reached[f"{prefix}.shortcut.0"] = following
    return reached


def resnet18_reached_bn() -> dict:
    """torchvision's BasicBlock is post-activation: every conv is followed by its own BN."""
    reached = {"conv1": "bn1", "fc": None}
    for stage in range(1, 5):
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            reached[f"{prefix}.conv1"] = f"{prefix}.bn1"
            reached[f"{prefix}.conv2"] = f"{prefix}.bn2"
            if stage > 1 and block == 0:
                reached[f"{prefix}.downsample.0"] = f"{prefix}.downsample.1"
    return reached


def expected_bounds(modules: dict, weighted: str, bn: str | None) -> np.ndarray:
    module = modules[weighted]
    if isinstance(module, nn.Linear):
        raw = np.linalg.norm(module.weight.detach().double().numpy(), axis=1)
    else:
        raw = svd_per_channel(module.weight)
    if bn is None:
        return raw
    norm = modules[bn]
    gamma = norm.weight.detach().double().numpy()
    var = norm.running_var.detach().double().numpy()
    return raw * np.abs(gamma) / np.sqrt(var + norm.eps)


@pytest.mark.parametrize("builder, reached, shape", [
    (lambda: PreActResNet18(num_classes=10), preact_reached_bn, (1, 3, 8, 8)),
    (lambda: torchvision.models.resnet18(weights=None, num_classes=10), resnet18_reached_bn, (1, 3, 16, 16)),
], ids=["preactresnet18", "torchvision_resnet18"])
def test_dataflow_pairing_is_clp_definition_by_hand_svd(builder, reached, shape):
    torch.manual_seed(0)
    model = randomise_norms(builder(), seed=1)
    modules = dict(model.named_modules())
    units = {u.name: u for u in compute_channel_lipschitz(model, torch.zeros(shape), u=2.0)}
    expected = reached()
    assert set(units) == set(expected)  # one unit per conv and linear; every BN is reached by some conv
    for name, bn in expected.items():
        unit = units[name]
        assert (unit.conv, unit.bn) == (name, bn or ""), name
        if bn is None:
            assert unit.kind in ("conv", "linear") and unit.modules == RAW, name
        else:
            assert unit.kind == "conv+bn" and unit.modules.startswith(f"{name} -> {bn}"), name
        values = expected_bounds(modules, name, bn)
        np.testing.assert_allclose(unit.values, values, rtol=1e-5, err_msg=name)
        threshold = values.mean() + 2.0 * values.std(ddof=1)
        assert unit.threshold == pytest.approx(threshold, rel=1e-6)
        assert unit.flagged.tolist() == np.flatnonzero(values > threshold).tolist()


def test_dataflow_pairing_through_a_residual_sum_says_so():
    model = randomise_norms(PreActResNet18(num_classes=10), seed=2)
    units = {u.name: u for u in compute_channel_lipschitz(model, torch.zeros(1, 3, 8, 8))}
    assert units["layer2.0.conv2"].modules == "layer2.0.conv2 -> layer2.1.bn1 (through a residual sum)"
    assert units["layer2.0.conv1"].modules == "layer2.0.conv1 -> layer2.0.bn2"


# --- BackdoorBench's CLP ---------------------------------------------------------------------------

@torch.no_grad()  # the arithmetic is the same with or without a graph; this only spares building one
def backdoorbench_clp_prune(net: nn.Module, u: float) -> dict:
    """BackdoorBench's defense/clp.py `CLP_prune`, as published (the statements are theirs); it also
    returns each BN's channel_lips so that the test can compare the numbers."""
    lips_per_bn = {}
    params = net.state_dict()
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            std = m.running_var.sqrt()
            weight = m.weight
            channel_lips = []
            for idx in range(weight.shape[0]):
                w = conv.weight[idx].reshape(conv.weight.shape[1], -1) * (weight[idx] / std[idx]).abs()  # noqa: F821
                channel_lips.append(torch.svd(w.cpu())[1].max())
            channel_lips = torch.Tensor(channel_lips)
            lips_per_bn[name] = channel_lips
            index = torch.where(channel_lips > channel_lips.mean() + u * channel_lips.std())[0]
            params[name + '.weight'][index] = 0
            params[name + '.bias'][index] = 0
        elif isinstance(m, nn.Conv2d):
            conv = m  # noqa: F841
    net.load_state_dict(params)
    return lips_per_bn


def backdoor_like_preact(seed: int) -> nn.Module:
    """PreAct-ResNet-18 with random BNs, tiny variances where eps (left out by BackdoorBench) matters,
    and outstanding channels in a conv2 and in the shortcut summed with it."""
    torch.manual_seed(seed)
    model = randomise_norms(PreActResNet18(num_classes=10), seed=seed, eps=1e-5)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (model.layer2[1].bn2, model.layer3[1].bn1):
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) * 4e-5 + 1e-5)
        model.layer3[0].conv2.weight[5] *= 12
        model.layer3[0].shortcut[0].weight[7] *= 12
        model.layer2[1].conv1.weight[3] *= 12
    return model


def zeroed_channels(before: nn.Module, after: nn.Module) -> dict:
    found = {}
    old, new = dict(before.named_modules()), dict(after.named_modules())
    for name, module in new.items():
        if isinstance(module, nn.BatchNorm2d):
            gone = ((module.weight == 0) & (module.bias == 0) & (old[name].weight != 0)).nonzero().flatten().tolist()
            if gone:
                found[name] = gone
    return found


def test_backdoorbench_pairing_reproduces_the_channels_backdoorbench_clp_zeroes():
    model = backdoor_like_preact(seed=3)
    pruned = copy.deepcopy(model)
    reference_lips = backdoorbench_clp_prune(pruned, u=3.0)
    expected = zeroed_channels(model, pruned)
    assert expected["layer3.1.bn1"] and expected["layer2.1.bn2"]  # the outstanding channels are pruned

    units = compute_channel_lipschitz(model, u=3.0, pairing="backdoorbench")
    assert [u.name for u in units] == list(reference_lips)  # one unit per BatchNorm2d, in registration order
    for unit in units:
        np.testing.assert_allclose(unit.values, reference_lips[unit.name].double().numpy(), rtol=1e-6,
                                   err_msg=unit.name)
    assert {u.name: u.flagged.tolist() for u in units if len(u.flagged)} == expected

    by_bn = {u.name: u for u in units}
    # Registration order, not data flow: layer3.1.bn1 is scaled with the shortcut registered last in
    # layer3.0, so BackdoorBench never weighs layer3.0.conv2's outstanding channel 5 ...
    assert (by_bn["layer3.1.bn1"].conv, by_bn["layer2.0.bn1"].conv) == ("layer3.0.shortcut.0", "layer1.1.conv2")
    assert 7 in expected["layer3.1.bn1"]
    # ... which the definition's pairing flags in its own row.
    dataflow = {u.name: u for u in compute_channel_lipschitz(model, torch.zeros(1, 3, 8, 8), u=3.0)}
    assert 5 in dataflow["layer3.0.conv2"].flagged and dataflow["layer3.0.conv2"].bn == "layer3.1.bn1"


def test_backdoorbench_pairing_refuses_what_backdoorbench_cannot_run():
    no_conv_before = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    with pytest.raises(UserError, match="BackdoorBench's CLP .* no Conv2d is registered before BatchNorm2d '0'"):
        compute_channel_lipschitz(no_conv_before, pairing="backdoorbench")
    too_wide = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(6))
    with pytest.raises(UserError, match="BatchNorm2d '1' has 6 channels but the conv registered before it, '0', "
                                        "has 4 output channels"):
        compute_channel_lipschitz(too_wide, pairing="backdoorbench")


def test_demo_clp_defense_zeroes_what_backdoorbench_clp_zeroes():
    from demo.defense_clp import prune_clp

    model = backdoor_like_preact(seed=4)
    reference = copy.deepcopy(model)
    backdoorbench_clp_prune(reference, u=3.0)
    pruned = copy.deepcopy(model)
    zeroed = prune_clp(pruned, u=3.0)
    assert zeroed == sum(len(v) for v in zeroed_channels(model, reference).values()) > 0
    for key, value in reference.state_dict().items():
        assert torch.equal(pruned.state_dict()[key], value), key


# --- the script ---------------------------------------------------------------------------------

def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_lips_script_backdoorbench_pairing_names_the_pruned_channels(tmp_path):
    import backdoor_lens.analyses.lips
    from backdoor_lens.args import make_args

    model = backdoor_like_preact(seed=5)
    bb = make_bb_root(tmp_path / "root", n_train=20, n_test=20, state_dict=model.state_dict())
    reference = copy.deepcopy(model)
    backdoorbench_clp_prune(reference, u=3.0)
    expected = zeroed_channels(model, reference)

    backdoor_lens.analyses.lips.ANALYSIS.run(make_args(backdoor_lens.analyses.lips.add_arguments, result_file_attack=str(bb.record_dir),
                              output_dir=str(tmp_path / "out"), pairing="backdoorbench", quiet=True))
    out = tmp_path / "out" / "lips"
    flagged = read_csv(out / "lips_flagged_attack.csv")
    found = {}
    for row in flagged:
        found.setdefault(row["layer"], []).append(int(row["neuron"]))
    assert {k: sorted(v) for k, v in found.items()} == expected
    rows = read_csv(out / "lips_attack.csv")
    pair = [r for r in rows if r["layer"] == "layer3.1.bn1"]
    assert {(r["conv"], r["bn"]) for r in pair} == {("layer3.0.shortcut.0", "layer3.1.bn1")}
    assert len(rows) == sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_lips_help_explains_both_pairings(script):
    result = script("visual_lips.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--pairing {dataflow,backdoorbench}" in text
    for phrase in ("residual sum", "last Conv2d registered before it", "without eps", "sqrt(var + eps)"):
        assert phrase in text, phrase
