"""Trigger footprints and localisation scores, the attribution methods, and the four attribution scripts.

The localisation claim (maps of poisoned images point at the trigger, unlike a blank map) is
checked on a small CNN trained here, in about a second, on images where only a 3 x 3 corner
patch decides the label. The scripts run on the miniature BackdoorBench record (random weights),
where their numbers are checked against footprints computed straight from the PNG files.
"""
import pickle
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

from tests.bb_fixture import make_bb_root
from backdoor_lens.args import make_args
from backdoor_lens.analysis import get
from backdoor_lens.attribution.explainers import (CAM_METHODS, METHODS, Attributor, Options, Skipped, compute_cam,
                                                  stage_layers, with_relu_modules)
from backdoor_lens.attribution.footprint import (footprint_mask, localisation, reduce_map, score_maps, summarize)
from backdoor_lens.models import PreActResNet18

REPO = Path(__file__).resolve().parents[2]
SIDE = 16
PATCH = (slice(SIDE - 4, SIDE - 1), slice(SIDE - 4, SIDE - 1))  # BadNets' corner: rows/cols 12..14


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models and batches are small: on a shared 2-core machine a second thread mostly spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a model that relies on a patch ------------------------------------------------------------
class TinyCNN(nn.Module):
    """Functional ReLUs, a BatchNorm and full-resolution convolutions (so CAMs can resolve a 3 x 3 patch)."""

    def __init__(self, channels=3, classes=2):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(16, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.conv2(out))
        return self.linear(self.pool(out).flatten(1))


def stamp(x):
    x = x.clone()
    x[..., PATCH[0], PATCH[1]] = 1.0
    return x


@pytest.fixture(scope="module")
def patch_model(one_thread):
    """Class 1 iff the white patch is present; the rest of the image is uniform noise."""
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
    clean = torch.rand(6, 3, SIDE, SIDE, generator=g)
    with torch.no_grad():
        accuracy = ((model(clean).argmax(1) == 0).float().mean() + (model(stamp(clean)).argmax(1) == 1).float().mean()) / 2
    assert accuracy >= 0.9, f"the patch model did not learn the patch (accuracy {accuracy:.2f})"
    return model, clean, stamp(clean)


# --- footprints and scores ---------------------------------------------------------------------
def test_footprint_of_a_known_patch_is_exactly_its_mask():
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 200, size=(2, 3, 32, 32)).astype(np.float64) / 255
    poisoned = clean.copy()
    poisoned[..., 28:31, 28:31] = 1.0
    noise = rng.random(poisoned.shape) < 0.2  # one-grey-level rounding elsewhere is not trigger
    poisoned[noise] = np.clip(poisoned[noise] + rng.choice([-1, 1], size=noise.sum()) / 255, 0, 1)
    poisoned[..., 28:31, 28:31] = 1.0
    expected = np.zeros((2, 32, 32), bool)
    expected[:, 28:31, 28:31] = True
    assert (footprint_mask(torch.tensor(poisoned), torch.tensor(clean)) == expected).all()
    assert (footprint_mask(torch.tensor(poisoned[0]), torch.tensor(clean[0])) == expected[0]).all()


def test_scores_of_the_mask_itself_are_one_and_of_a_uniform_map_the_chance_level():
    mask = np.zeros((10, 10), bool)
    mask[7:9, 6:9] = True  # 6 pixels
    perfect = localisation(mask.astype(float), mask)
    assert (perfect.share, perfect.pointing, perfect.iou, perfect.peak_distance) == (1.0, 1.0, 1.0, 0.0)
    # a uniform map ranks no pixel above another: its top-k IoU is that of a random ranking, by hand
    # k|M|/N pixels expected inside, over the union k + |M| minus that
    k, area, n = 6, 6, 100
    expected_iou = (k * area / n) / (k + area - k * area / n)
    for flat in (np.full((10, 10), 3.0), np.zeros((10, 10))):  # all-zero counts as blank
        s = localisation(flat, mask)
        assert s.share == pytest.approx(0.06) and s.pointing == pytest.approx(0.06)
        assert s.iou == pytest.approx(expected_iou)
    assert np.isnan(localisation(np.ones((10, 10)), np.zeros((10, 10), bool)).share)


def test_scores_of_hand_made_maps():
    mask = np.zeros((10, 10), bool)
    mask[0, 0:2] = True
    a = np.zeros((10, 10))
    a[0, 0], a[5, 5], a[0, 9] = 2.0, 2.0, 1.0  # two tied peaks, one inside
    s = localisation(a, mask)
    assert s.share == pytest.approx(2 / 5)
    assert s.pointing == pytest.approx(0.5)
    # k = 2: the top set is the two peaks, one of which is in the 2-pixel footprint
    assert s.iou == pytest.approx(1 / 3)
    assert s.peak_distance == pytest.approx((0 + np.hypot(5, 4)) / 2)
    # topk_percent 3 -> k = 3 pixels: both peaks and the 1.0 pixel
    assert localisation(a, mask, topk_percent=3).iou == pytest.approx(1 / 4)
    far = np.zeros((10, 10))
    far[0, 4] = 1.0
    assert localisation(far, mask).pointing == 0.0 and localisation(far, mask).peak_distance == pytest.approx(3.0)


def test_a_sparse_map_inside_the_footprint_is_scored_by_its_support():
    """Issue 13.6: 5 non-zero pixels inside a 9-pixel footprint, k = 9. The 4 top-k places left go to
    the 1019 tied zeros, 4 of which are in the footprint: expected intersection 5 + 4 * 4 / 1019."""
    mask = np.zeros((32, 32), bool)
    mask[28:31, 28:31] = True
    sparse = np.zeros((32, 32))
    sparse[28, 28:31] = [3.0, 2.0, 1.0]
    sparse[29, 28:30] = [0.5, 0.25]
    inside = 5 + 4 * 4 / (1024 - 5)
    expected = inside / (9 + 9 - inside)
    assert localisation(sparse, mask).iou == pytest.approx(expected, rel=1e-12)
    # the same map with 1e-9 noise breaks the ties at random: almost surely the 4 extra places fall
    # outside the footprint (IoU 5 / 13); the expected value differs from that by 0.0012
    noisy = [localisation(sparse + 1e-9 * np.random.default_rng(seed).random((32, 32)), mask).iou
             for seed in range(20)]
    assert np.mean(noisy) == pytest.approx(expected, abs=0.01)
    assert localisation(sparse, mask).iou > 40 * (9 / 1024)  # far from the blank level it scored before


def test_reduce_map_sums_absolute_channels_and_resizes():
    a = torch.tensor([[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 1.0], [2.0, -1.0]]])  # 2 x 2 x 2
    assert np.allclose(reduce_map(a, (2, 2)), [[2.0, 3.0], [2.0, 4.0]])
    assert reduce_map(torch.ones(3, 1, 4, 4), (8, 8)).shape == (3, 8, 8)
    assert np.allclose(reduce_map(torch.full((1, 4, 4), 2.0), (8, 8)), 2.0)


def test_score_rows_and_summary_are_plain_means():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), bool)
    masks[:, 5:7, 5:7] = True
    maps = rng.random((4, 8, 8))
    rows = score_maps(maps, masks, "m", [{"model": "attack", "i": i} for i in range(4)], seed=3)
    assert [r["method"] for r in rows[:3]] == ["m", "blank", "random"] and len(rows) == 12
    table = {r["method"]: r for r in summarize(rows)}
    shares = [maps[i][masks[i]].sum() / maps[i].sum() for i in range(4)]
    assert table["m"]["share"] == pytest.approx(np.mean(shares))
    assert table["blank"]["pointing"] == pytest.approx(4 / 64) and table["m"]["images"] == 4


# --- methods -----------------------------------------------------------------------------------
def test_relu_module_copy_computes_the_same_function():
    torch.manual_seed(0)
    model = PreActResNet18(10).eval()
    copy, why = with_relu_modules(model)
    assert why is None
    assert sum(isinstance(m, nn.ReLU) for m in copy.modules()) == 16  # two F.relu per block, eight blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(copy(x), model(x), atol=1e-5)
    assert stage_layers(model, x) == ["layer1.1.conv2", "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


def test_deeplift_sums_to_the_output_difference(patch_model):
    """DeepLift's summation-to-delta holds only when its rule sees every ReLU: a check of the copy."""
    model, clean, poisoned = patch_model
    baseline = torch.zeros(1, 3, SIDE, SIDE)
    attribution = Attributor(model, Options(baseline=baseline)).attribute("deeplift", poisoned, [1] * 6)
    with torch.no_grad():
        delta = model(poisoned)[:, 1] - model(baseline)[:, 1]
    assert torch.allclose(attribution.sum((1, 2, 3)), delta, rtol=1e-3, atol=1e-4)


def test_occlusion_matches_a_hand_computed_score_drop(patch_model):
    model, _, poisoned = patch_model
    opts = Options(occlusion_window=4, occlusion_stride=4)  # each pixel in exactly one window
    attribution = Attributor(model, opts).attribute("occlusion", poisoned[:1], [1])
    occluded = poisoned[:1].clone()
    occluded[..., 12:16, 12:16] = 0.0
    with torch.no_grad():
        drop = model(poisoned[:1])[0, 1] - model(occluded)[0, 1]
    assert torch.allclose(attribution[0, :, 12:16, 12:16], drop.expand(3, 4, 4), atol=1e-5)


def test_each_method_gives_maps_of_the_input_shape(patch_model):
    model, _, poisoned = patch_model
    x = poisoned[:2]
    attributor = Attributor(model, Options(layer_name="conv2", smooth_samples=4, ig_steps=8, superpixel=4,
                                           perturbation_samples=16, shapley_permutations=1))
    for method in METHODS:
        try:
            out = attributor.attribute(method, x, [1, 0])
        except Skipped:
            assert method == "lrp"
            continue
        assert out.shape == ((2, 1, SIDE, SIDE) if method == "gradcam" else (2, 3, SIDE, SIDE)), method
        assert torch.isfinite(out).all(), method
    for method in CAM_METHODS:
        cam = compute_cam(model, "conv2", x, [1, 0], method, batch_size=8)
        assert cam.shape == (2, SIDE, SIDE) and np.isfinite(cam).all(), method


def test_lrp_is_skipped_with_a_reason_where_captum_has_no_rule():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    with pytest.raises(Skipped, match="no rule"):
        Attributor(model).attribute("lrp", torch.rand(1, 3, 8, 8), [0])


def test_maps_of_poisoned_images_point_at_the_patch(patch_model):
    """Grad-CAM and occlusion (the issue's two) and the other Captum methods beat the blank map."""
    model, clean, poisoned = patch_model
    masks = footprint_mask(poisoned, clean)
    assert (masks == np.broadcast_to(_patch_mask(), masks.shape)).all()
    blank = 9 / SIDE ** 2
    cam = compute_cam(model, "conv2", poisoned, [1] * 6, "gradcam")
    scores = {"grad-cam package": summarize(score_maps(reduce_map(cam[:, None], (SIDE, SIDE)), masks, "m"))}
    attributor = Attributor(model, Options(layer_name="conv2", smooth_samples=8, ig_steps=16))
    for method in ("occlusion", "gradcam", "saliency", "integrated_gradients", "deeplift"):
        reduced = reduce_map(attributor.attribute(method, poisoned, [1] * 6), (SIDE, SIDE))
        scores[method] = summarize(score_maps(reduced, masks, "m"))
    for method, table in scores.items():
        row = {r["method"]: r for r in table}
        assert row["blank"]["pointing"] == pytest.approx(blank)
        assert row["m"]["share"] > 3 * blank, method
        assert row["m"]["pointing"] > 2 * blank, method
    for method in ("grad-cam package", "occlusion", "gradcam"):
        assert {r["method"]: r for r in scores[method]}["m"]["pointing"] >= 0.8, method


def test_shap_values_of_poisoned_images_point_at_the_patch(patch_model):
    from backdoor_lens.analyses.shap import compute_shap

    model, clean, poisoned = patch_model
    values, classes = compute_shap(model, poisoned[:3], torch.rand(8, 3, SIDE, SIDE), ranked_outputs=2, nsamples=32)
    assert values.shape == (3, 3, SIDE, SIDE, 2) and classes.shape == (3, 2)
    assert (classes[:, 0] == 1).all()
    table = {r["method"]: r for r in summarize(score_maps(reduce_map(values[..., 0], (SIDE, SIDE)),
                                                          footprint_mask(poisoned[:3], clean[:3]), "shap"))}
    assert table["shap"]["pointing"] > table["blank"]["pointing"] + 0.3
    # on a layer's input (shap's (model, layer) form): the features are that layer's input
    values, _ = compute_shap(model, poisoned[:2], torch.rand(4, 3, SIDE, SIDE), 1, 4, layer=model.conv2)
    assert values.shape == (2, 8, SIDE, SIDE, 1)


def test_frequency_profile_of_a_pure_cosine():
    from backdoor_lens.analyses.fre import (input_gradients, log_magnitude, low_frequency_share, power_spectrum,
                                            radial_profile)

    xx = np.arange(32)
    g = torch.tensor(np.cos(2 * np.pi * 4 * xx / 32)[None, None, None, :].repeat(32, axis=2))  # 1 x 1 x 32 x 32
    profile = radial_profile(power_spectrum(g))
    assert profile[0, 4] == pytest.approx(1.0)
    assert low_frequency_share(profile, (32, 32), 0.5)[0] == pytest.approx(1.0)  # 4 / 16 <= 0.5
    assert low_frequency_share(profile, (32, 32), 0.2)[0] == pytest.approx(0.0)
    assert np.isfinite(log_magnitude(power_spectrum(torch.zeros(1, 3, 8, 8)))).all()
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    grads = input_gradients(linear, torch.rand(2, 3, 4, 4), [1, 0])
    assert torch.allclose(grads[0].flatten(), linear[1].weight[1]) and torch.allclose(grads[1].flatten(),
                                                                                      linear[1].weight[0])


def test_attribution_math_never_draws():
    """attribution/ is pure math: importing it, the pipeline included, loads no matplotlib."""
    code = ("import sys, backdoor_lens.attribution.pipeline, backdoor_lens.attribution.explainers, "
            "backdoor_lens.attribution.footprint, backdoor_lens.attribution.ranking; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _patch_mask():
    m = np.zeros((SIDE, SIDE), bool)
    m[PATCH] = True
    return m


# --- the scripts on miniature records -------------------------------------------------------------
def cifar_test_images(bb):
    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(batch[b"labels"])


def png_footprint_pixels(bb, index) -> int:
    """Straight from the files: pixels where the poisoned PNG differs from the clean image by 2+ levels."""
    images, labels = cifar_test_images(bb)
    png = np.asarray(Image.open(bb.record_dir / "bd_test_dataset" / str(labels[index]) / f"{index}.png"), np.int64)
    return int((np.abs(png - images[index].astype(np.int64)) >= 2).any(-1).sum())


def hand_radial_energy(bb, original_index: int, poisoned: int, explained: int) -> np.ndarray:
    """Energy of the input gradient per integer radius, from the record's files alone: the state_dict,
    the CIFAR test image (or its poisoned PNG), CIFAR-10's normalisation, numpy's FFT and a loop."""
    from tests.bb_fixture import load_raw

    model = PreActResNet18(10)
    model.load_state_dict(load_raw(bb.record_dir / "attack_result.pt")["model"])
    model.eval()
    images, labels = cifar_test_images(bb)
    pixels = images[original_index]
    if poisoned:
        pixels = np.asarray(Image.open(bb.record_dir / "bd_test_dataset" / str(labels[original_index])
                                       / f"{original_index}.png"))
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.247, 0.243, 0.261])
    x = torch.tensor(((pixels / 255.0 - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32,
                     requires_grad=True)
    model(x)[0, int(explained)].backward()
    gradient = x.grad[0].double().numpy()
    power = np.fft.fftshift(sum(np.abs(np.fft.fft2(channel)) ** 2 for channel in gradient))
    energy = np.zeros(int(round(np.hypot(16, 16))) + 1)
    for u in range(32):
        for v in range(32):
            energy[int(round(np.hypot(u - 16, v - 16)))] += power[u, v]
    return energy


def run_script(name, **values):
    analysis = get(name)
    return analysis.run(make_args(analysis.add_arguments, default_split=analysis.default_split, quiet=True,
                                  device="cpu", **values))


def test_gradcam_script_scores_against_the_record_footprints(bb, tmp_path):
    out = tmp_path / "out"
    summary = run_script("gradcam", result_file_attack=bb.record_dir, output_dir=out, num_images=1,
                         num_scored=3, cam_layers="stages")
    folder = out / "gradcam"
    rows = pd.read_csv(folder / "gradcam_localisation.csv")
    assert set(rows["layer"]) == set(summary["layers"]) and len(summary["layers"]) == 4
    assert len(rows) == 3 * 4 * 3  # images x layers x (gradcam, blank, random)
    for _, row in rows[rows.method == "blank"].iterrows():
        pixels = png_footprint_pixels(bb, row["original_index"])
        assert row["footprint_pixels"] == pixels > 0
        assert row["share"] == pytest.approx(pixels / 1024) and row["pointing"] == pytest.approx(pixels / 1024)
    predictions = pd.read_csv(folder / "gradcam_predictions.csv")
    assert len(predictions) == 1 + 3 and predictions["shown"].sum() == 2
    assert (folder / "gradcam_gradcam.png").stat().st_size > 0 and (folder / "gradcam_localisation.png").exists()


def test_gradcam_with_a_defense_maps_both_models(bb, tmp_path):
    torch.manual_seed(3)
    defense = tmp_path / "defense" / "ft"
    defense.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": PreActResNet18(10).state_dict()},
               defense / "defense_result.pt")
    run_script("gradcam", result_file_attack=bb.record_dir, result_file_defense=defense,
               output_dir=tmp_path / "out", num_images=1, num_scored=1, target="target")
    folder = tmp_path / "out" / "gradcam"
    predictions = pd.read_csv(folder / "gradcam_predictions.csv")
    assert set(predictions["model"]) == {"attack", "defense"} and (predictions["explained_class"] == bb.target).all()
    assert set(pd.read_csv(folder / "gradcam_localisation_summary.csv")["model"]) == {"attack", "defense"}


def test_saliency_shap_and_fre_scripts_write_their_tables(bb, tmp_path):
    out = tmp_path / "out"
    methods = ["saliency", "occlusion", "gradcam", "deeplift"]
    summary = run_script("saliency", result_file_attack=bb.record_dir, output_dir=out, num_images=1,
                         num_scored=2, methods=",".join(methods), occlusion_window=8)
    rows = pd.read_csv(out / "saliency" / "saliency_localisation.csv")
    baselines = {"blank", "random", "edge"}
    assert len(rows) == 2 * (len(methods) + 3) and set(rows["method"]) == set(methods) | baselines
    table = pd.read_csv(out / "saliency" / "saliency_localisation_summary.csv").set_index("method")
    assert table.loc["saliency", "share"] == pytest.approx(rows[rows.method == "saliency"]["share"].mean())
    assert summary["poisoned_images_scored"] == 2 and (out / "saliency" / "saliency_localisation.png").exists()

    run_script("shap", result_file_attack=bb.record_dir, output_dir=out, num_images=1, nsamples=4,
               background=4)
    values = pd.read_csv(out / "shap" / "shap_values.csv")
    assert len(values) == 2 * 2 and set(values["poisoned"]) == {0, 1}
    assert len(pd.read_csv(out / "shap" / "shap_localisation.csv")) == 3

    run_script("fre", result_file_attack=bb.record_dir, output_dir=out, num_images=2)
    shares = pd.read_csv(out / "fre" / "fre_energy_share.csv")
    profile = pd.read_csv(out / "fre" / "fre_radial_profile.csv")
    assert len(shares) == 4 and set(shares["poisoned"]) == {0, 1}
    for _, row in shares.iterrows():
        by_radius = hand_radial_energy(bb, int(row["original_index"]), int(row["poisoned"]), int(row["explained"]))
        low = by_radius[:9].sum() / by_radius.sum()  # radius r / 16 <= 0.5, the default --low_cutoff
        assert row["low_frequency_share"] == pytest.approx(low, abs=1e-5)
        assert row["high_frequency_share"] == pytest.approx(1 - low, abs=1e-5)
        written = profile[profile.position == row["position"]].sort_values("radius")["energy_share"].to_numpy()
        assert np.allclose(written, by_radius / by_radius.sum(), atol=1e-5)


def test_compute_is_pure_and_chooses_the_declared_split(bb, tmp_path, capsys):
    """compute draws, writes and prints nothing; the images come from the declared default split."""
    from backdoor_lens.analyses import fre
    from backdoor_lens.context import load_context

    args = make_args(fre.add_arguments, default_split=fre.ANALYSIS.default_split, quiet=True, device="cpu",
                     result_file_attack=bb.record_dir, output_dir=tmp_path / "out", num_images=1)
    with load_context(args, "fre", split=None) as ctx:
        result = fre.compute(ctx, fre.settings(args))
        assert not (tmp_path / "out").exists() and capsys.readouterr().out == ""
    images = result.images
    assert images.split.name == "mixed" and ctx.split is images.split and len(images) == 2
    assert list(images.poison) == [False, True] and images.footprint(0) is None and images.footprint(1).any()
    assert [r["method"] for r in result.rows] == ["input_gradient", "blank", "random"]


def test_clean_prototype_record_explains_clean_images_only(bb, tmp_path, capsys):
    record = tmp_path / "record" / "proto"
    record.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(PreActResNet18(10).state_dict(), record / "clean_model.pth")
    common = dict(result_file_attack=record, dataset="cifar10", model="preactresnet18", dataset_path=bb.data_dir,
                  output_dir=tmp_path / "out", num_images=1)
    for name, extra in (("gradcam", {}), ("saliency", {"methods": "saliency,gradcam"}),
                        ("shap", {"nsamples": 2, "background": 2}), ("fre", {})):
        summary = run_script(name, **common, **extra)
        assert "no poisoned samples" in capsys.readouterr().out
        assert summary["split"] == "clean_test" and "localisation" not in summary
    assert not list((tmp_path / "out").glob("*/*localisation*"))


def test_grayscale_record_runs(tmp_path):
    bb = make_bb_root(tmp_path, dataset="mnist", n_train=20, n_test=20)
    run_script("gradcam", result_file_attack=bb.record_dir, output_dir=tmp_path / "out", num_images=1,
               num_scored=1)
    rows = pd.read_csv(tmp_path / "out" / "gradcam" / "gradcam_localisation.csv")
    assert rows["footprint_pixels"].iloc[0] > 0
    run_script("saliency", result_file_attack=bb.record_dir, output_dir=tmp_path / "out", num_images=1,
               num_scored=1, methods="saliency,guided_backprop")
    assert (tmp_path / "out" / "saliency" / "saliency_maps.png").stat().st_size > 0


def test_bad_input_is_one_line_and_leaves_nothing(bb, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "visual_saliency.py"), "--result_file_attack",
                             str(bb.record_dir), "--methods", "saliency,nonsense", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown --methods nonsense" in result.stderr
    assert not any(tmp_path.iterdir())
