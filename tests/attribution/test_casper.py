"""Casper et al.'s attribution benchmark (issue 17): its scores, baselines, explainers and ranking.

Scores are checked against numpy, the edge baseline against a Sobel filter written out here, the
superpixel explainers against the exact contributions of a linear model, the ranking's intervals
against normal theory, and the benchmark's claim (occlusion beats the blank map on correlation)
on a small CNN trained here, in about a second, to rely on a 3 x 3 patch.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from backdoor_lens.args import make_args
from backdoor_lens.attribution.explainers import Attributor, Options, superpixel_mask
from backdoor_lens.attribution.ranking import rank_methods
from backdoor_lens.attribution.footprint import edge_map, footprint_mask, localisation, reduce_map, score_maps

REPO = Path(__file__).resolve().parents[2]
SIDE = 16
CASPER_SET = {"integrated_gradients", "saliency", "deeplift", "deeplift_shap", "gradient_shap", "input_x_gradient",
              "guided_backprop", "guided_gradcam", "deconvolution", "feature_ablation", "occlusion",
              "feature_permutation", "shapley_value_sampling", "lime", "kernel_shap", "lrp"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models and batches: on a shared 2-core machine a second thread mostly spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- scores and baselines --------------------------------------------------------------------------
def test_correlation_and_l1_match_numpy():
    rng = np.random.default_rng(4)
    mask = np.zeros((12, 12), bool)
    mask[2:5, 7:11] = True
    a = rng.random((12, 12)) * 3
    a[mask] += 1.5
    s = localisation(a, mask)
    assert s.correlation == pytest.approx(np.corrcoef(a.ravel(), mask.ravel().astype(float))[0, 1], rel=1e-12)
    scaled = (a - a.min()) / (a.max() - a.min())
    assert s.l1 == pytest.approx(np.abs(scaled - mask).sum() / 144, rel=1e-12)
    # the map is |A|: a negative attribution counts by its size
    assert localisation(-a, mask).correlation == pytest.approx(s.correlation)
    exact = localisation(mask * 7.0, mask)
    assert exact.correlation == pytest.approx(1.0) and exact.l1 == pytest.approx(0.0)
    # the blank map: no correlation (defined as 0) and, scaled to 0, L1 = |M| / N
    blank = localisation(np.full((12, 12), 2.0), mask)
    assert blank.correlation == 0.0 and blank.l1 == pytest.approx(12 / 144)


def hand_sobel_magnitude(image: np.ndarray) -> np.ndarray:
    """C x H x W -> H x W: per channel sqrt(Gx^2 + Gy^2) with the 3 x 3 Sobel kernels, borders replicated."""
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=float)
    ky = kx.T
    channels, h, w = image.shape
    out = np.zeros((h, w))
    for c in range(channels):
        padded = np.pad(image[c], 1, mode="edge")
        for i in range(h):
            for j in range(w):
                window = padded[i:i + 3, j:j + 3]
                out[i, j] += np.hypot((kx * window).sum(), (ky * window).sum())
    return out


def test_edge_baseline_is_the_sobel_magnitude_of_the_image():
    rng = np.random.default_rng(2)
    images = rng.random((2, 3, 9, 11))
    images[1, :, 3:6, 4:8] = 1.0
    expected = np.stack([hand_sobel_magnitude(im) for im in images])
    assert np.allclose(edge_map(torch.tensor(images)), expected, rtol=1e-12, atol=1e-12)
    assert np.allclose(edge_map(images[1]), expected[1])
    rows = score_maps(rng.random((2, 9, 11)), np.broadcast_to(images[1, 0] == 1.0, (2, 9, 11)), "m",
                      [{"position": i} for i in range(2)], images=images)
    edge_rows = [r for r in rows if r["method"] == "edge"]
    assert len(edge_rows) == 2
    assert edge_rows[1]["correlation"] == pytest.approx(
        np.corrcoef(expected[1].ravel(), (images[1, 0] == 1.0).ravel())[0, 1])


# --- explainers --------------------------------------------------------------------------------------
def test_superpixel_mask_is_a_grid_of_cells():
    expected = np.array([[0, 0, 0, 1, 1, 1, 2],
                         [0, 0, 0, 1, 1, 1, 2],
                         [0, 0, 0, 1, 1, 1, 2],
                         [3, 3, 3, 4, 4, 4, 5],
                         [3, 3, 3, 4, 4, 4, 5]])
    assert (superpixel_mask((5, 7), 3).numpy() == expected).all()


def test_superpixel_methods_give_each_cell_its_exact_share_of_a_linear_model():
    """f(x) = W x + b with baseline 0: a cell's contribution is sum over its pixels of W_t,i x_i. Feature
    ablation and Shapley value sampling are exact for an additive model, and so is KernelSHAP's
    regression once it has seen enough coalitions; LIME's Lasso shrinks but keeps the order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    x = torch.rand(2, 2, 8, 8)
    targets = [2, 0]
    weights = model[1].weight.detach().numpy().reshape(3, 2, 8, 8)
    cells = np.arange(64).reshape(8, 8)
    cells = (cells // 8 // 4) * 2 + (cells % 8) // 4  # 4 x 4 cells, ids 0..3
    options = Options(superpixel=4, perturbation_samples=64, shapley_permutations=3)
    attributor = Attributor(model, options)
    for i, t in enumerate(targets):
        contribution = (weights[t] * x[i].numpy()).sum(axis=0)  # per pixel, both channels
        per_cell = np.array([contribution[cells == c].sum() for c in range(4)])
        expected = per_cell[cells]
        for method in ("feature_ablation", "shapley_value_sampling", "kernel_shap"):
            out = attributor.attribute(method, x, targets)[i].numpy()
            assert np.allclose(out, np.broadcast_to(expected, out.shape), atol=1e-4), method
        lime = attributor.attribute("lime", x, targets)[i, 0].numpy()
        assert np.corrcoef(lime.ravel(), expected.ravel())[0, 1] > 0.9


# --- ranking -----------------------------------------------------------------------------------------
def test_bootstrap_intervals_and_verdicts():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.normal(0.0, 1.0, n)
    methods = {"better": base + 0.2 + rng.normal(0, 0.1, n),  # paired: always about 0.2 above
               "same": base + rng.normal(0, 0.1, n)}
    rows = []
    for i in range(n):
        rows.append({"position": i, "method": "blank", "correlation": base[i]})
        rows += [{"position": i, "method": m, "correlation": v[i]} for m, v in methods.items()]
    table = {r["method"]: r for r in rank_methods(rows, scores=("correlation",), baselines=("blank",),
                                                  resamples=4000, seed=1)}
    # the 95% interval of a mean: about mean +- 1.96 s / sqrt(n)
    half = 1.96 * base.std(ddof=1) / np.sqrt(n)
    assert table["blank"]["mean"] == pytest.approx(base.mean())
    assert table["blank"]["low"] == pytest.approx(base.mean() - half, abs=0.15 * half)
    assert table["blank"]["high"] == pytest.approx(base.mean() + half, abs=0.15 * half)
    assert table["better"]["beats_blank"] is True and table["better"]["difference_blank"] == pytest.approx(0.2, abs=0.02)
    assert table["same"]["beats_blank"] is False and table["blank"]["beats_blank"] is None
    # lower is better on L1: a smaller distance beats the baseline
    l1_rows = [{"position": i, "method": m, "l1": v} for i in range(20)
               for m, v in (("blank", 0.5 + 0.01 * i), ("close", 0.2 + 0.01 * i))]
    close = next(r for r in rank_methods(l1_rows, scores=("l1",), baselines=("blank",), resamples=200)
                 if r["method"] == "close")
    assert close["beats_blank"] is True and close["difference_blank"] == pytest.approx(0.3)


# --- the benchmark's claim on a model that relies on a patch ------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.linear = nn.Linear(16, 2)

    def forward(self, x):
        out = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.linear(out.mean(dim=(2, 3)))


def stamp(x):
    x = x.clone()
    x[..., 12:15, 12:15] = 1.0
    return x


def test_occlusion_beats_the_blank_map_on_correlation_with_the_patch():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        x = torch.rand(64, 3, SIDE, SIDE, generator=g)
        y = torch.randint(0, 2, (64,), generator=g)
        x[y == 1] = stamp(x[y == 1])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    clean = torch.rand(8, 3, SIDE, SIDE, generator=g)
    poisoned = stamp(clean)
    with torch.no_grad():
        assert (model(poisoned).argmax(1) == 1).float().mean() >= 0.9, "the model did not learn the patch"
    masks = footprint_mask(poisoned, clean)
    maps = reduce_map(Attributor(model).attribute("occlusion", poisoned, [1] * 8), (SIDE, SIDE))
    rows = score_maps(maps, masks, "occlusion", [{"position": i} for i in range(8)], images=poisoned)
    correlations = [np.corrcoef(maps[i].ravel(), masks[i].ravel())[0, 1] for i in range(8)]
    table = {(r["method"], r["score"]): r for r in rank_methods(rows, resamples=1000)}
    occlusion = table[("occlusion", "correlation")]
    assert occlusion["mean"] == pytest.approx(np.mean(correlations))
    assert occlusion["beats_blank"] is True and occlusion["low"] > 0.3
    assert table[("blank", "correlation")]["mean"] == 0.0


# --- the script on the miniature record ----------------------------------------------------------------
def run_saliency(**values):
    from backdoor_lens.analyses.saliency import ANALYSIS

    return ANALYSIS.run(make_args(ANALYSIS.add_arguments, default_split=ANALYSIS.default_split, quiet=True, device="cpu",
                                  **values))


def test_casper_methods_rank_on_the_record_footprints(bb, tmp_path):
    out = tmp_path / "out"
    summary = run_saliency(result_file_attack=bb.record_dir, output_dir=out, num_images=1, num_scored=2,
                           methods="casper", occlusion_window=8, occlusion_stride=4, smooth_samples=2, ig_steps=4,
                           perturbation_samples=16, shapley_permutations=1, bootstrap=200)
    folder = out / "saliency"
    assert set(summary["methods"]) | set(summary["skipped"]) == CASPER_SET
    ranking = pd.read_csv(folder / "saliency_ranking.csv")
    ranked = set(summary["methods"]) | {"blank", "random", "edge"}
    for score in ("correlation", "l1", "share", "pointing", "iou"):
        assert set(ranking[ranking.score == score]["method"]) == ranked
    best_first = [r["mean"] for r in summary["ranking"]]
    assert {r["method"] for r in summary["ranking"]} == ranked and best_first == sorted(best_first, reverse=True)
    rows = pd.read_csv(folder / "saliency_localisation.csv")
    images, labels = cifar_test_images(bb)
    for _, row in rows[rows.method.isin(["blank", "edge"])].iterrows():
        index = int(row["original_index"])
        png = np.asarray(Image.open(bb.record_dir / "bd_test_dataset" / str(labels[index]) / f"{index}.png"))
        footprint = (np.abs(png.astype(np.int64) - images[index].astype(np.int64)) >= 2).any(-1)
        if row["method"] == "blank":
            assert row["correlation"] == 0.0 and row["l1"] == pytest.approx(footprint.sum() / 1024)
        else:
            edges = hand_sobel_magnitude(png.transpose(2, 0, 1) / 255.0)
            assert row["correlation"] == pytest.approx(np.corrcoef(edges.ravel(), footprint.ravel())[0, 1], abs=1e-6)
    assert (folder / "saliency_ranking.png").stat().st_size > 0
    assert json.loads((folder / "summary.json").read_text())["ranking"][0]["score"] == "correlation"


def cifar_test_images(bb):
    import pickle

    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(batch[b"labels"])


@pytest.mark.parametrize("flags, message", [(["--methods", "casper,nonsense"], "unknown --methods nonsense"),
                                            (["--superpixel", "0"], "--superpixel must be at least 1")])
def test_bad_casper_flags_are_one_line_and_leave_nothing(bb, tmp_path, flags, message):
    result = subprocess.run([sys.executable, str(REPO / "visual_saliency.py"), "--result_file_attack",
                             str(bb.record_dir), "--output_dir", str(tmp_path), *flags],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not any(tmp_path.iterdir())
