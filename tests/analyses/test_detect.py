"""backdoor_lens/analyses/detect.py and backdoor_lens/stats/detectors.py: every score against an independent computation, the
detectors on planted examples, the per-sample CSV against the reported numbers, and bad input."""
import csv
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.linalg import expm

from tests.bb_fixture import load_raw, make_bb_root, make_record_kind
from backdoor_lens.stats.detectors import (activation_clustering, anomaly_index, evaluate, mahalanobis, que_scores,
                             reverse_engineer, spectral_signature, spectre, strip_entropy, strip_threshold)
from backdoor_lens.stats.embedding import CLEAN, CROSS, POISONED
from backdoor_lens.attribution.footprint import localisation
from tests.helpers import run_in_process

QUICK = ["--strip_inputs", "16", "--strip_overlays", "3", "--strip_clean", "8", "--nc_images", "4", "--nc_batch", "4",
         "--nc_steps", "3", "--quiet", "--device", "cpu"]


# --- independent references ------------------------------------------------------------------
def rank_auroc(scores, positive):
    """Mann-Whitney: the probability that a poisoned sample outranks a clean one, ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def hand_average_precision(scores, positive):
    """Mean over the poisoned samples of the precision among all samples scored at least as high (no ties)."""
    order = np.argsort(-scores)
    hits = positive[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return precision_at[hits].mean()


def hand_tpr_at_fpr(scores, positive, limit):
    best = 0.0
    for threshold in np.concatenate([[np.inf], np.unique(scores)]):
        flagged = scores >= threshold
        if flagged[~positive].mean() <= limit:
            best = max(best, flagged[positive].mean())
    return best


def planted_features(seed=0, classes=5, clean=60, poisoned=15, dims=12, target=0):
    """Class clusters in feature space; the poisoned samples carry the target label and form a cluster of their
    own, off the target class along one axis (the trigger's feature)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, size=(classes, dims))
    feats, labels, groups = [], [], []
    for c in range(classes):
        feats.append(means[c] + rng.normal(0, 1, size=(clean, dims)))
        labels += [c] * clean
        groups += [CLEAN] * clean
    shift = np.zeros(dims)
    shift[3] = 12.0
    feats.append(means[target] + shift + rng.normal(0, 1, size=(poisoned, dims)))
    labels += [target] * poisoned
    groups += [POISONED] * poisoned
    return np.concatenate(feats), np.array(labels), np.array(groups)


# --- scores against independent computations -------------------------------------------------
def test_spectral_signature_matches_numpy_svd():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 6)) * np.array([3, 1, 1, 0.5, 0.5, 0.2])
    labels = np.repeat([0, 1, 2], 10)
    result = spectral_signature(features, labels, poison_ratio=0.2)
    for c in range(3):
        x = features[labels == c] - features[labels == c].mean(axis=0)
        _, _, vt = np.linalg.svd(x)
        expected = (x @ vt[0]) ** 2
        np.testing.assert_allclose(result.scores[labels == c], expected, rtol=1e-10)
        # Tran et al.'s rule: the 1.5 * 0.2 * 10 = 3 largest of each class.
        flagged = np.zeros(10, bool)
        flagged[np.argsort(-expected)[:3]] = True
        np.testing.assert_array_equal(result.flags[labels == c], flagged)


def test_auroc_ap_and_tpr_match_rank_computations():
    rng = np.random.default_rng(2)
    groups = np.array([CLEAN] * 300 + [POISONED] * 40 + [CROSS] * 20)
    scores = rng.normal(size=len(groups)) + 1.3 * (groups == POISONED) + 5.0 * (groups == CROSS)
    flags = scores > 1.0
    m = evaluate(scores, groups, flags)
    kept = groups != CROSS
    s, y = scores[kept], groups[kept] == POISONED
    assert m["auroc"] == pytest.approx(rank_auroc(s, y), abs=1e-12)
    assert m["ap"] == pytest.approx(hand_average_precision(s, y), abs=1e-12)
    assert m["tpr_at_1fpr"] == pytest.approx(hand_tpr_at_fpr(s, y, 0.01))
    assert m["tpr_at_5fpr"] == pytest.approx(hand_tpr_at_fpr(s, y, 0.05))
    assert m["rule_tpr"] == pytest.approx((scores[groups == POISONED] > 1.0).mean())
    assert m["rule_fpr"] == pytest.approx((scores[groups == CLEAN] > 1.0).mean())
    assert (m["poisoned"], m["clean"], m["cross"]) == (40, 300, 20)
    # With ties, AUROC is still the Mann-Whitney probability with ties counting half.
    tied = np.round(scores * 2) / 2
    assert evaluate(tied, groups, flags)["auroc"] == pytest.approx(rank_auroc(tied[kept], y), abs=1e-12)


class TinyLinear(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = torch.tensor(weight), torch.tensor(bias)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def test_strip_entropy_by_hand():
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(size=(3, 4)) * 3, rng.normal(size=3)
    inputs, overlays = rng.random((2, 1, 2, 2)), rng.random((3, 1, 2, 2))
    model = TinyLinear(weight, bias)
    got = strip_entropy(model, torch.tensor(inputs), torch.tensor(overlays), lambda x: (x - 0.5) / 0.25, "cpu",
                        batch_size=4)
    for i in range(2):
        entropies = []
        for j in range(3):
            blend = ((inputs[i] + overlays[j]) / 2).ravel()
            logits = weight @ ((blend - 0.5) / 0.25) + bias
            p = np.exp(logits - logits.max())
            p /= p.sum()
            entropies.append(-sum(q * np.log2(q) for q in p))
        assert got[i] == pytest.approx(np.mean(entropies), rel=1e-9)
    clean = np.arange(100.0)
    assert strip_threshold(clean, 0.01) == pytest.approx(0.99)


def test_mahalanobis_matches_hand_ledoit_wolf():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    labels = np.repeat([0, 1], 20)
    got = mahalanobis(features, labels)
    r = features.copy()
    for c in (0, 1):
        r[labels == c] -= features[labels == c].mean(axis=0)
    n, p = r.shape
    sample = r.T @ r / n
    mu = np.trace(sample) / p
    delta = ((sample - mu * np.eye(p)) ** 2).sum() / p
    beta = sum((((np.outer(x, x) - sample) ** 2).sum()) for x in r) / n ** 2 / p
    shrinkage = min(beta, delta) / delta
    covariance = (1 - shrinkage) * sample + shrinkage * mu * np.eye(p)
    expected = np.einsum("ij,jk,ik->i", r, np.linalg.inv(covariance), r)
    np.testing.assert_allclose(got.scores, expected, rtol=1e-8)
    np.testing.assert_array_equal(got.flags, expected > expected.mean() + 3 * expected.std())


def test_que_scores_match_matrix_exponential():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(50, 4)) * np.array([2.0, 1.0, 0.8, 0.5])
    sigma = w.T @ w / len(w)
    top = np.linalg.eigvalsh(sigma).max()
    q = expm(4.0 * (sigma - np.eye(4)) / (top - 1))
    q /= np.trace(q)
    np.testing.assert_allclose(que_scores(w, 4.0), [x @ q @ x for x in w], rtol=1e-9)


def test_spectre_matches_a_hand_pipeline():
    from sklearn.covariance import MinCovDet

    rng = np.random.default_rng(6)
    features = rng.normal(size=(30, 8)) * np.linspace(3, 0.5, 8)
    labels = np.zeros(30, int)
    got = spectre(features, labels, poison_ratio=0.1, dim=3, seed=0)
    x = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(x)
    z = x @ vt[:3].T
    mcd = MinCovDet(random_state=0).fit(z)
    values, vectors = np.linalg.eigh(mcd.covariance_)
    w = (z - mcd.location_) @ vectors @ np.diag(values ** -0.5) @ vectors.T  # symmetric whitening
    sigma = w.T @ w / len(w)
    q = expm(4.0 * (sigma - np.eye(3)) / (np.linalg.eigvalsh(sigma).max() - 1))
    expected = np.array([v @ q @ v for v in w]) / np.trace(q)
    np.testing.assert_allclose(got.scores, expected, rtol=1e-7)
    assert got.flags.sum() == round(1.5 * 0.1 * 30)
    assert set(np.flatnonzero(got.flags)) == set(np.argsort(-expected)[:5])


def test_activation_clustering_matches_a_hand_two_means():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(7)
    features = np.concatenate([rng.normal(size=(40, 12)), rng.normal(size=(8, 12)) + 6.0])
    predicted = np.zeros(48, int)
    got = activation_clustering(features, predicted, dim=10, size_threshold=0.35, seed=0)
    x = features - features.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(x.T))
    z = x @ vectors[:, ::-1][:, :10]  # the top 10 principal components, not whitened
    assign = KMeans(2, n_init=10, random_state=0).fit_predict(z)
    small = np.argmin(np.bincount(assign))
    np.testing.assert_array_equal(got.flags, assign == small)  # 8 / 48 < 0.35
    assert set(np.flatnonzero(got.flags)) == set(range(40, 48))
    c_small, c_large = z[assign == small].mean(0), z[assign != small].mean(0)
    u = (c_small - c_large) / np.linalg.norm(c_small - c_large)
    t = (z - (c_small + c_large) / 2) @ u
    centre = np.where(assign == small, 1, -1) * np.linalg.norm(c_small - c_large) / 2
    np.testing.assert_allclose(got.scores, t / np.sqrt(np.mean((t - centre) ** 2)), rtol=1e-6)


def test_planted_poison_is_found_by_the_training_set_detectors():
    features, labels, groups = planted_features()
    detections = {"ac": activation_clustering(features, labels), "ss": spectral_signature(features, labels, 0.05),
                  "mahalanobis": mahalanobis(features, labels), "spectre": spectre(features, labels, 0.05)}
    for name, detection in detections.items():
        auroc = rank_auroc(detection.scores, groups == POISONED)
        assert auroc > 0.95, (name, auroc)
        assert evaluate(detection.scores, groups, detection.flags)["auroc"] == pytest.approx(auroc)


# --- Neural Cleanse --------------------------------------------------------------------------
class PlantedTrigger(torch.nn.Module):
    """Classes 0-2 read the mean of colour channels 0-2; class 3 fires on a bright 2x2 corner patch."""

    def forward(self, x):
        colour = 10 * x.mean(dim=(2, 3))
        patch = x[:, :, -2:, -2:].mean(dim=(1, 2, 3))
        return torch.cat([colour, (40 * (patch - 0.6))[:, None]], dim=1)


def test_neural_cleanse_flags_the_planted_target_and_finds_its_patch():
    rng = np.random.default_rng(8)
    images = np.full((12, 3, 8, 8), 0.1)
    for i in range(12):
        images[i, i % 3] = 0.5
    images += rng.uniform(0, 0.05, size=images.shape)
    images[:, :, -2:, -2:] = 0.1
    result = reverse_engineer(PlantedTrigger(), torch.tensor(images, dtype=torch.float32), [0, 1, 2, 3],
                              lambda x: x, "cpu", steps=100, batch_size=6, lr=0.1, seed=0)
    assert result.flagged == 3, result.norms
    assert result.norms[3] < 8 and result.norms[:3].min() > 15, result.norms
    patch = np.zeros((8, 8), bool)
    patch[-2:, -2:] = True
    assert localisation(result.masks[3], patch).iou >= 0.5


def test_anomaly_index_by_hand():
    norms = np.array([10.0, 50, 52, 55, 49, 60])
    median = 51.0
    mad = 1.4826 * np.median(np.abs(norms - median))
    np.testing.assert_allclose(anomaly_index(norms), np.abs(norms - median) / mad)


# --- the script ------------------------------------------------------------------------------
def run_detect(argv):
    """backdoor-lens detect in this process: (exit code, stdout, stderr)."""
    return run_in_process("detect", argv)

def add_cross_samples(bb, count=3):
    """Turn `count` clean, non-target training samples into WaNet-style cross samples: flagged, label kept."""
    path = bb.record_dir / "attack_result.pt"
    raw = load_raw(path)
    state = raw["bd_train"]
    images, all_labels = [], []
    for k in range(1, 6):
        with open(bb.data_dir / "cifar-10-batches-py" / f"data_batch_{k}", "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        all_labels += batch[b"labels"]
    images = np.concatenate(images)
    chosen = [i for i in range(bb.n_train) if state["poison_indicator"][i] == 0 and all_labels[i] != bb.target][:count]
    folder = state["bd_data_container"]["save_folder_path"]
    for i in chosen:
        noisy = np.clip(images[i].astype(int) + 20, 0, 255).astype(np.uint8)
        label = int(all_labels[i])
        png = bb.record_dir / "bd_train_dataset" / str(label) / f"{i}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(png)
        state["bd_data_container"]["data_dict"][np.int64(i)] = {"path": f"{folder}/{label}/{i}.png",
                                                                "other_info": [label, label]}
        state["poison_indicator"][i] = 1.0
    torch.save(raw, path)
    return chosen


@pytest.fixture(scope="module")
def cross_record(tmp_path_factory):
    bb = make_bb_root(tmp_path_factory.mktemp("detect_bb"), n_train=60, n_test=30)
    return bb, add_cross_samples(bb)


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_script_csv_reproduces_the_reported_numbers(cross_record, tmp_path):
    bb, cross = cross_record
    visual = tmp_path / "rec" / "visual"
    code, stdout, stderr = run_detect(["--result_file_attack", bb.record_dir, "--dataset_path", bb.data_dir,
                                       "--output_dir", visual] + QUICK)
    assert code == 0, stderr
    folder = visual / "detect"
    summary = json.loads((folder / "summary.json").read_text())
    table = {row["detector"]: row for row in read_csv(folder / "detect_summary.csv")}
    rows = read_csv(folder / "detect_scores.csv")
    assert set(table) == {"ac", "ss", "spectre", "mahalanobis", "strip"}
    for name in table:
        mine = [r for r in rows if r["detector"] == name]
        kept = [r for r in mine if r["group"] != "cross"]
        scores = np.array([float(r["score"]) for r in kept])
        positive = np.array([r["poisoned"] == "1" for r in kept])
        assert all(r["poisoned"] in ("0", "1") for r in kept)
        expected = rank_auroc(scores, positive)
        assert float(table[name]["auroc"]) == pytest.approx(expected, abs=1e-9)
        assert summary[f"auroc_{name}"] == pytest.approx(expected, abs=1e-9)
        flags = np.array([r["flagged"] == "1" for r in kept])
        assert summary[f"rule_tpr_{name}"] == pytest.approx(flags[positive].mean())
        assert summary[f"rule_fpr_{name}"] == pytest.approx(flags[~positive].mean())
    # The cross samples: their own group, no poisoned/clean truth, left out of the counts.
    ss = [r for r in rows if r["detector"] == "ss"]
    cross_rows = [r for r in ss if r["group"] == "cross"]
    assert sorted(int(r["index"]) for r in cross_rows) == sorted(cross)
    assert all(r["poisoned"] == "" for r in cross_rows)
    assert summary["cross"] == len(cross) and summary["poisoned"] == len(bb.train_poison)
    assert int(table["ss"]["poisoned"]) == len(bb.train_poison) and int(table["ss"]["cross"]) == len(cross)
    assert len(ss) == bb.n_train
    # SS's rule uses the record's poison ratio, cross samples not counted: 6 of 60.
    assert summary["poison_ratio"] == pytest.approx(len(bb.train_poison) / bb.n_train)
    # Neural Cleanse: one row per class; the BadNets footprint is the 3x3 patch.
    nc = read_csv(folder / "detect_nc.csv")
    assert [int(r["class"]) for r in nc] == list(range(10))
    assert summary["nc_footprint_pixels"] == 9
    norms = np.array([float(r["mask_l1"]) for r in nc])
    median = np.median(norms)
    np.testing.assert_allclose([float(r["anomaly_index"]) for r in nc],
                               np.abs(norms - median) / (1.4826 * np.median(np.abs(norms - median))), rtol=1e-6)
    for figure in ("detect_roc.png", "detect_nc.png"):
        assert (folder / figure).stat().st_size > 0
    run = json.loads((folder / "run.json").read_text())
    assert run["split"] == "bd_train" and run["samples"] == bb.n_train
    # The report shows the section and the key numbers.
    from backdoor_lens.report.build import build_report
    page = build_report(tmp_path / "rec").read_text()
    assert "Poison detectors vs ground truth" in page and 'alt="detect_roc.png"' in page
    assert f"ss {float(table['ss']['auroc']):.4g}" in page


@pytest.mark.parametrize("case", ["clean split", "no poisoned after n_sub", "unknown detector", "prototype"])
def test_bad_input_is_one_clear_line(cross_record, tmp_path, case):
    bb, _ = cross_record
    base = ["--result_file_attack", bb.record_dir, "--dataset_path", bb.data_dir]
    argv, message = {
        "clean split": (base + ["--visual_dataset", "clean_train"], "has no poisoned training samples"),
        "no poisoned after n_sub": (base + ["--visual_dataset", "subset", "--n_sub", "1"],
                                    "need poisoned samples; split subset has none"),
        "unknown detector": (base + ["--detectors", "ac,magic"], "unknown --detectors magic"),
        "prototype": (make_record_kind(tmp_path / "proto", "prototype"), "needs poisoned samples"),
    }[case]
    out = tmp_path / "out"
    code, _, stderr = run_detect(list(argv) + ["--output_dir", out] + QUICK)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, stderr
    assert message in lines[0] and "Traceback" not in stderr
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


def test_bad_input_from_the_command_line(cross_record, script, tmp_path):
    bb, _ = cross_record
    result = script("visual_detect.py", "--result_file_attack", bb.record_dir, "--visual_dataset", "clean_test",
                    "--output_dir", tmp_path / "out", "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "bd_train or subset" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def served_training_set(bb):
    """The training set as the attack served it, read straight from the files: (images, labels)."""
    raw = load_raw(bb.record_dir / "attack_result.pt")
    images, labels = [], []
    for k in range(1, 6):
        with open(bb.data_dir / "cifar-10-batches-py" / f"data_batch_{k}", "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += batch[b"labels"]
    images, labels = np.concatenate(images), np.array(labels)
    for index, entry in raw["bd_train"]["bd_data_container"]["data_dict"].items():
        images[int(index)] = np.asarray(Image.open(bb.record_dir / entry["path"].split(f"{bb.record_dir.name}/")[1]))
        labels[int(index)] = entry["other_info"][0]
    return images, labels, raw["model"]


def test_spectral_scores_follow_from_the_records_images(cross_record, tmp_path):
    """The features behind the scores are the input of the last Linear layer, one row per served sample."""
    from backdoor_lens.models import PreActResNet18

    bb, _ = cross_record
    code, _, stderr = run_detect(["--result_file_attack", bb.record_dir, "--dataset_path", bb.data_dir, "--detectors",
                                  "ss", "--output_dir", tmp_path, "--quiet", "--device", "cpu"])
    assert code == 0, stderr
    rows = read_csv(tmp_path / "detect" / "detect_scores.csv")
    got = {int(r["index"]): float(r["score"]) for r in rows}
    images, labels, state_dict = served_training_set(bb)
    model = PreActResNet18(10)
    model.load_state_dict(state_dict)
    model.eval()
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.247, 0.243, 0.261])
    x = torch.tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    captured = []
    model.linear.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        model(x)
    features = captured[0].double().numpy()
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        centred = features[members] - features[members].mean(axis=0)
        top = np.linalg.svd(centred)[2][0]
        np.testing.assert_allclose([got[i] for i in members], (centred @ top) ** 2, rtol=1e-3, atol=1e-9)


def test_record_without_bd_train_gets_strip_and_neural_cleanse(tmp_path):
    flags = make_record_kind(tmp_path / "blind", "no_bd_train")
    code, stdout, stderr = run_detect(flags + ["--output_dir", tmp_path / "out"] + QUICK)
    assert code == 0, stderr
    summary = json.loads((tmp_path / "out" / "detect" / "summary.json").read_text())
    assert "auroc_strip" in summary and "nc_flagged_class" in summary
    assert not any(key.endswith(("_ac", "_ss", "_spectre", "_mahalanobis")) for key in summary)
    assert "training-set detectors are skipped" in summary["notes"][0] and summary["notes"][0] in stdout
    rows = read_csv(tmp_path / "out" / "detect" / "detect_scores.csv")
    assert {r["detector"] for r in rows} == {"strip"} and {r["split"] for r in rows} == {"mixed"}
