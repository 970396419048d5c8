"""Model-level analyses (Hessian, Lipschitz, feature visualisation, network, image quality) against
independent computations: a dense Hessian, one SVD per channel, PSNR of a known perturbation,
parameter counts read straight from the record file, images read straight from the PNGs."""
import csv
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.func import functional_call

from tests.bb_fixture import load_raw, make_bb_root, make_record_kind
from tests.oracles import LAST, direct_pairs, direct_tac
from backdoor_lens.device import set_quiet
from backdoor_lens.stats.feature_vis import Objective, compute_feature_visualisation
from backdoor_lens.stats.hessian import HessianOperator, compute_hessian_spectrum, hutchinson_trace, slq_density, top_eigenvalues
from backdoor_lens.stats.lipschitz import compute_channel_lipschitz

set_quiet(True)


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


# --- Hessian ---------------------------------------------------------------------------------

def dense_hessian(model, x, y):
    """The full Hessian of the mean cross-entropy, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = theta[start:start + size].view(shape)
            start += size
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 3, (24,))
    return model, x, y, dense_hessian(model, x, y)


def test_hessian_vector_product_and_top_eigenvalues_match_dense(mlp_problem):
    model, x, y, hessian = mlp_problem
    op = HessianOperator(model, [(x[:10], y[:10]), (x[10:], y[10:])])  # two unequal batches, one mean loss
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), hessian @ v, rtol=1e-9, atol=1e-12)
    dense = np.linalg.eigvalsh(hessian.numpy())
    by_magnitude = dense[np.argsort(-np.abs(dense))][:3]
    top = top_eigenvalues(op, k=3, tol=1e-10, max_iter=3000)
    assert all(top.converged)
    assert list(top.eigenvalues) == sorted(top.eigenvalues, reverse=True)
    np.testing.assert_allclose(top.eigenvalues, np.sort(by_magnitude)[::-1], rtol=0.01)
    assert top.eigenvalues[0] == pytest.approx(dense.max(), rel=1e-6)


def test_hessian_block_of_chosen_parameters(mlp_problem):
    model, x, y, hessian = mlp_problem
    block = hessian[-15:, -15:]  # the last Linear's 12 weights and 3 biases
    spectrum = compute_hessian_spectrum(model, [(x, y)], top_k=1, tol=1e-10, max_iter=3000, trace_probes=2,
                                        lanczos_steps=15, density_probes=1, param_prefixes=["2"])
    assert spectrum.dim == 15
    assert spectrum.top.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(block.numpy()).max(), rel=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # frozen parameters are restored


def test_lanczos_nodes_are_the_eigenvalues_and_density_integrates_to_one(mlp_problem):
    model, x, y, hessian = mlp_problem
    op = HessianOperator(model, [(x, y)])
    density = slq_density(op, steps=op.dim, probes=2, bins=4000)
    dense = np.linalg.eigvalsh(hessian.numpy())
    for nodes, weights in zip(density.nodes, density.weights):
        assert weights.sum() == pytest.approx(1.0)
        for node in nodes[weights > 1e-8]:  # every well-weighted Ritz value is an eigenvalue
            assert np.abs(dense - node).min() < 1e-6
    assert np.trapezoid(density.density, density.grid) == pytest.approx(1.0, rel=1e-3)


def test_hutchinson_trace_matches_dense():
    """A one-hot linear model: its Hessian (block diagonal softmax covariances) is dense enough to be
    a real test, and diagonal enough that a few hundred Rademacher probes reach a 0.25% standard error."""
    torch.manual_seed(1)
    features, classes = 20, 10
    model = nn.Linear(features, classes, bias=False).double()
    nn.init.normal_(model.weight, std=0.3)
    x = torch.eye(features, dtype=torch.float64).repeat(3, 1)
    y = torch.randint(0, classes, (len(x),))
    hessian = dense_hessian(model, x, y)
    trace = torch.trace(hessian).item()
    off = (hessian ** 2).sum().item() - (torch.diagonal(hessian) ** 2).sum().item()
    probes = int(math.ceil(2 * off / (0.0025 * trace) ** 2))  # Var(v^T H v) = 2 sum_{i != j} H_ij^2
    assert probes < 2000
    op = HessianOperator(model, [(x, y)])
    estimate = hutchinson_trace(op, probes=probes)
    assert estimate.probes == probes
    assert estimate.trace == pytest.approx(trace, rel=0.01)


def test_hessian_script_on_bb(bb, script, tmp_path):
    result = script("visual_hessian.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path,
                    "--visual_dataset", "bd_test", "--n_sub", "8", "--batch_size", "4", "--hessian_batches", "2",
                    "--hessian_params", "linear", "--top_k", "2", "--tol", "1e-2", "--max_iter", "500", "--trace_probes", "3",
                    "--lanczos_steps", "5", "--density_probes", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "hessian"
    values = [float(r["eigenvalue"]) for r in read_csv(out / "hessian_eigenvalues.csv")]
    assert len(values) == 2 and values[0] >= values[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 8 and summary["batches"] == 2
    assert summary["attack"]["parameters"] == 512 * 10 + 10
    assert all(summary["attack"]["converged"])
    # Ritz values lie inside the spectrum: none may exceed the top eigenvalue (beyond the tolerance).
    assert max(summary["attack"]["ritz_values"][0]) <= values[0] * (1 + 1e-2)
    rows = read_csv(out / "hessian_density.csv")
    grid = np.array([float(r["grid_attack"]) for r in rows])
    assert np.trapezoid([float(r["density_attack"]) for r in rows], grid) == pytest.approx(1.0, rel=1e-2)
    assert (out / "hessian_density.png").stat().st_size > 0


# --- Lipschitz -------------------------------------------------------------------------------

def svd_per_channel(weight: torch.Tensor) -> np.ndarray:
    w = weight.detach().double().numpy()
    return np.array([np.linalg.svd(w[c].reshape(w.shape[1], -1), compute_uv=False).max() for c in range(len(w))])


def randomise_bn(bn, generator):
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.1)
        bn.eps = 0.05  # large, so that forgetting eps would show


class TinyGraph(nn.Module):
    """Every way a conv can meet a BN: directly, through a residual sum, through an in-place ReLU;
    a BN on a concatenation (no single conv reaches it); a conv that meets a pooling and the head first."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_sum = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 5, 1)
        self.bn_b = nn.BatchNorm2d(5)
        self.bn_cat = nn.BatchNorm2d(11)
        self.conv_c = nn.Conv2d(11, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        s = self.stem(x)
        out = self.conv(torch.relu(self.bn_a(s))) + s
        out = self.conv_b(torch.relu(self.bn_sum(out)))
        out = self.bn_b(torch.relu_(out))
        out = self.conv_c(self.bn_cat(torch.cat([out, s], 1)))
        return self.head(nn.functional.avg_pool2d(out, 2).mean((2, 3)))


def test_lipschitz_equals_svd_per_channel_and_follows_the_graph():
    torch.manual_seed(0)
    model = TinyGraph().eval()
    generator = torch.Generator().manual_seed(1)
    for bn in (model.bn_a, model.bn_sum, model.bn_b, model.bn_cat):
        randomise_bn(bn, generator)
    with torch.no_grad():
        model.conv.weight[2] *= 8  # one outstanding channel, through a BN that does not hide it
        model.bn_sum.weight[2] = model.bn_sum.weight.abs().max()
    units = {u.name: u for u in compute_channel_lipschitz(model, torch.zeros(1, 3, 8, 8), u=1.5)}
    assert list(units) == ["stem", "conv", "conv_b", "bn_cat", "conv_c", "head"]

    def scale(bn):
        return (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()

    # The stem also reaches bn_sum through the sum; the first BN its output reaches is bn_a.
    assert (units["stem"].kind, units["stem"].modules) == ("conv+bn", "stem -> bn_a")
    np.testing.assert_allclose(units["stem"].values, svd_per_channel(model.stem.weight) * scale(model.bn_a), rtol=1e-5)
    assert units["conv"].modules == "conv -> bn_sum (through a residual sum)"
    np.testing.assert_allclose(units["conv"].values, svd_per_channel(model.conv.weight) * scale(model.bn_sum),
                               rtol=1e-5)
    assert units["conv_b"].modules == "conv_b -> bn_b (through a ReLU)"  # in place: the graph still leads there
    np.testing.assert_allclose(units["conv_b"].values, svd_per_channel(model.conv_b.weight) * scale(model.bn_b),
                               rtol=1e-5)
    assert (units["bn_cat"].kind, units["bn_cat"].conv) == ("bn", "")
    np.testing.assert_allclose(units["bn_cat"].values, scale(model.bn_cat), rtol=1e-5)
    assert (units["conv_c"].kind, units["conv_c"].bn, units["conv_c"].modules) == \
        ("conv", "", "raw kernel norm, reaches no BN")
    np.testing.assert_allclose(units["conv_c"].values, svd_per_channel(model.conv_c.weight), rtol=1e-5)
    np.testing.assert_allclose(units["head"].values, np.linalg.norm(model.head.weight.detach().numpy(), axis=1),
                               rtol=1e-5)
    values = svd_per_channel(model.conv.weight) * scale(model.bn_sum)
    assert units["conv"].threshold == pytest.approx(values.mean() + 1.5 * values.std(ddof=1))
    assert units["conv"].flagged.tolist() == [2]


def test_lips_script_on_bb(bb, script, tmp_path):
    result = script("visual_lips.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path,
                    "--normalize_by_layer", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "lips" / "lips_attack.csv")
    state = load_raw(bb.record_dir / "attack_result.pt")["model"]
    convs = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4]
    # Every conv output channel once, every linear row; every BN of a PreAct-ResNet is reached by a conv.
    assert len(rows) == sum(state[k].shape[0] for k in convs) + 10
    assert not [r for r in rows if r["kind"] == "bn"]

    def bound(conv, bn):
        return svd_per_channel(state[f"{conv}.weight"]) * (
            state[f"{bn}.weight"].abs() / torch.sqrt(state[f"{bn}.running_var"] + 1e-5)).double().numpy()

    for conv, bn in (("layer2.1.conv1", "layer2.1.bn2"), ("conv1", "layer1.0.bn1"),
                     ("layer2.0.conv2", "layer2.1.bn1"), ("layer2.0.shortcut.0", "layer2.1.bn1")):
        pair = [r for r in rows if r["layer"] == conv]
        assert {(r["conv"], r["bn"]) for r in pair} == {(conv, bn)}
        np.testing.assert_allclose([float(r["lips"]) for r in pair], bound(conv, bn), rtol=1e-5)
    last = [r for r in rows if r["layer"] == "layer4.1.conv2"]
    assert {(r["bn"], r["pairing"]) for r in last} == {("", "raw kernel norm, reaches no BN")}
    np.testing.assert_allclose([float(r["lips"]) for r in last], svd_per_channel(state["layer4.1.conv2.weight"]),
                               rtol=1e-5)
    flagged = read_csv(tmp_path / "lips" / "lips_flagged_attack.csv")
    assert len(flagged) == sum(r["above_threshold"] == "True" for r in rows)
    assert all(float(r["lips"]) > float(r["threshold"]) for r in flagged)
    assert (tmp_path / "lips" / "lips.png").stat().st_size > 0


# --- feature visualisation -------------------------------------------------------------------

def test_feature_visualisation_raises_its_channel_far_above_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    normalize = lambda x: (x - 0.5) / 0.25  # noqa: E731
    with torch.no_grad():
        noise = model[:4](normalize(torch.rand(64, 3, 16, 16))).mean((2, 3))[:, 2]
    result = compute_feature_visualisation(model, [Objective("channel", 2), Objective("logit", 1)], "3", (3, 16, 16),
                                           normalize, steps=40, lr=0.1, tv_weight=0.01)
    assert result.images.shape == (2, 3, 16, 16) and 0 <= result.images.min() and result.images.max() <= 1
    assert result.final[0] > 50 * result.initial[0]
    assert result.final[0] > 1.3 * noise.max().item()  # better than the best of 64 random images
    with torch.no_grad():  # the reported value is the channel's mean activation on the returned image
        check = model[:4](normalize(torch.from_numpy(result.images[:1]))).mean((2, 3))[0, 2].item()
    assert check == pytest.approx(result.final[0], rel=1e-4)
    assert result.final[1] > result.initial[1]
    assert all(p.requires_grad for p in model.parameters())


def test_fv_script_follows_tac_and_refuses_bad_channels(bb, script, tmp_path):
    result = script("visual_fv.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path, "--n_channels", "2",
                    "--steps", "2", "--target", "class", "--quiet")
    assert result.returncode == 0, result.stderr
    # The top 2 channels of the default layer by TAC over every poisoned sample of bd_train and its
    # clean twin, computed from the files (tests/oracles.py).
    tac = direct_tac(direct_pairs(bb, "bd_train")[LAST])
    top = np.argsort(-tac, kind="stable")[:2].tolist()
    out = read_csv(tmp_path / "fv" / "fv_activations.csv")
    assert [(r["objective"], int(r["index"])) for r in out] == [("channel", top[0]), ("channel", top[1]),
                                                                ("logit", bb.target)]
    summary = json.loads((tmp_path / "fv" / "summary.json").read_text())
    assert summary["channels_chosen_by"] == f"top 2 by TAC ({len(bb.train_poison)} poisoned/clean pairs of bd_train)"
    run = json.loads((tmp_path / "fv" / "run.json").read_text())
    assert run["split"] == "bd_train" and run["poisoned_samples"] == len(bb.train_poison)
    assert np.load(tmp_path / "fv" / "fv_images_attack.npy").shape == (3, 3, 32, 32)
    assert (tmp_path / "fv" / "fv_attack.png").stat().st_size > 0
    bad = script("visual_fv.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path / "bad",
                 "--channels", "3,999", "--steps", "1", "--quiet")
    assert bad.returncode == 2 and "out of range" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "fv").exists()


def test_fv_without_poisoned_samples_follows_the_lipschitz_bound(tmp_path):
    from backdoor_lens.analyses.fv import ANALYSIS, add_arguments
    from backdoor_lens.args import make_args
    from backdoor_lens.models import PreActResNet18

    flags = make_record_kind(tmp_path / "kind", "prototype")
    args = make_args(add_arguments, default_split=ANALYSIS.default_split, result_file_attack=flags[1],
                     dataset_path=flags[3], output_dir=str(tmp_path / "out"), n_channels=3, steps=1, quiet=True,
                     device="cpu")
    summary = ANALYSIS.run(args)
    model = PreActResNet18(10)
    model.load_state_dict(torch.load(tmp_path / "kind" / "record" / "prototype_mini" / "clean_model.pth"))
    unit = next(u for u in compute_channel_lipschitz(model.eval(), torch.zeros(1, 3, 32, 32))
                if LAST in (u.name, u.conv, u.bn))
    assert summary["channels"] == np.argsort(-unit.values, kind="stable")[:3].tolist()
    assert summary["channels_chosen_by"].startswith("top 3 by channel Lipschitz bound")
    assert json.loads((tmp_path / "out" / "fv" / "run.json").read_text())["split"] is None  # no data read


# --- network ---------------------------------------------------------------------------------

def test_network_script_table_and_diagrams(bb, script, tmp_path):
    result = script("visual_network.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path, "--quiet")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "network"
    rows = read_csv(out / "network_layers.csv")
    state = load_raw(bb.record_dir / "attack_result.pt")["model"]
    learnt = sum(v.numel() for k, v in state.items() if k.endswith((".weight", ".bias")))
    assert sum(int(r["parameters"]) for r in rows) == learnt
    assert len(rows) == 20 + 16 + 1 + 1  # convs, BNs, the pooling, the linear layer
    first = rows[0]
    assert (first["name"], first["input_shape"], first["output_shape"]) == ("conv1", "3x32x32", "64x32x32")
    linear = next(r for r in rows if r["name"] == "linear")
    assert float(linear["param_norm_attack"]) == pytest.approx(
        math.sqrt((state["linear.weight"].double() ** 2).sum() + (state["linear.bias"].double() ** 2).sum()), rel=1e-6)
    for name in ("network_torchview", "network_autograd"):
        assert (out / f"{name}.gv").read_text().startswith(("digraph", "strict digraph"))
        if shutil.which("dot"):
            assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_network_without_dot_writes_sources(bb, tmp_path, monkeypatch, capsys):
    import backdoor_lens.analyses.network
    from backdoor_lens.args import make_args

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    args = make_args(backdoor_lens.analyses.network.add_arguments, result_file_attack=str(bb.record_dir), output_dir=str(tmp_path),
                     quiet=True, no_autograd_graph=True, depth=1)
    summary = backdoor_lens.analyses.network.ANALYSIS.run(args)
    assert summary["diagrams"] == [] and summary["graphviz_sources"] == ["network_torchview.gv"]
    assert (tmp_path / "network" / "network_torchview.gv").exists()
    assert not (tmp_path / "network" / "network_torchview.png").exists()
    assert "dot -Tpng" in capsys.readouterr().out


# --- image quality ---------------------------------------------------------------------------

def test_quality_metrics_of_a_known_perturbation():
    from backdoor_lens.analyses.quality import ms_ssim_scales, pair_metrics

    clean = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.8
    delta = 0.05
    metrics = pair_metrics(clean + delta, clean, ms_ssim_scales(32, 32))
    np.testing.assert_allclose(metrics["psnr"], 10 * math.log10(1 / delta ** 2), rtol=1e-5)
    np.testing.assert_allclose(metrics["l2"], delta * math.sqrt(3 * 32 * 32), rtol=1e-5)
    np.testing.assert_allclose(metrics["linf"], delta, rtol=1e-5)
    np.testing.assert_allclose(metrics["changed_fraction"], 1.0)
    same = pair_metrics(clean, clean, 2)
    np.testing.assert_allclose(same["ssim"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(same["ms_ssim"], 1.0, rtol=1e-6)
    assert np.isinf(same["psnr"]).all() and (same["l2"] == 0).all()
    assert (ms_ssim_scales(28, 28), ms_ssim_scales(64, 64), ms_ssim_scales(256, 256), ms_ssim_scales(16, 16)) == (2, 3, 5, 0)


def test_quality_script_pairs_by_original_index(bb, script, tmp_path):
    result = script("visual_quality.py", "--result_file_attack", bb.record_dir, "--output_dir", tmp_path, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "LPIPS skipped" in result.stdout and "FID skipped" in result.stdout
    rows = read_csv(tmp_path / "quality" / "quality_per_image.csv")
    assert sorted(int(r["original_index"]) for r in rows) == sorted(bb.test_poison)
    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.array(batch[b"labels"])
    for row in rows[:5]:
        i = int(row["original_index"])
        poisoned = np.asarray(Image.open(bb.record_dir / "bd_test_dataset" / str(labels[i]) / f"{i}.png")) / 255.0
        delta = poisoned - images[i] / 255.0
        assert float(row["psnr"]) == pytest.approx(10 * math.log10(1 / (delta ** 2).mean()), rel=1e-4)
        assert float(row["linf"]) == pytest.approx(np.abs(delta).max(), rel=1e-5)
        assert int(row["original_label"]) == labels[i]
    summary = read_csv(tmp_path / "quality" / "quality_summary.csv")
    psnr = next(r for r in summary if r["metric"] == "psnr")
    assert float(psnr["mean"]) == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert (tmp_path / "quality" / "quality_examples.png").stat().st_size > 0


def test_quality_refuses_a_record_without_poisoned_samples(script, tmp_path):
    clean = make_bb_root(tmp_path / "root", n_train=20, n_test=20, with_bd_train=False, with_bd_test=False)
    result = script("visual_quality.py", "--result_file_attack", clean.record_dir, "--output_dir", tmp_path / "out",
                    "--quiet")
    assert result.returncode == 2 and "needs poisoned" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "quality").exists()


def test_bad_flags_are_refused_in_one_line_without_outputs(bb, tmp_path):
    import backdoor_lens.analyses.hessian
    import backdoor_lens.analyses.lips
    from backdoor_lens.args import make_args
    from backdoor_lens.errors import UserError

    common = dict(result_file_attack=str(bb.record_dir), output_dir=str(tmp_path), quiet=True)
    with pytest.raises(UserError, match="no parameter lies in 'nope'"):
        backdoor_lens.analyses.hessian.ANALYSIS.run(make_args(backdoor_lens.analyses.hessian.add_arguments, n_sub=4, hessian_params="nope", **common))
    with pytest.raises(UserError, match="--top_k must be at least 1"):
        backdoor_lens.analyses.hessian.ANALYSIS.run(make_args(backdoor_lens.analyses.hessian.add_arguments, top_k=0, **common))
    with pytest.raises(UserError, match="--u -1.0 must be non-negative"):
        backdoor_lens.analyses.lips.ANALYSIS.run(make_args(backdoor_lens.analyses.lips.add_arguments, u=-1, **common))
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder left behind
