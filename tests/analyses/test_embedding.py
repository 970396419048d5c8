"""t-SNE / UMAP: separability metrics against hand computations, and the scripts on miniature records."""
import csv
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bb_fixture import load_raw, make_bb_root, make_record_kind, write_defense
from backdoor_lens.stats.embedding import (CLEAN, CROSS, POISONED, available_cores, compute_embedding, exact_neighbours,
                             knn_purity, numba_cache_dir, reduce_pca, resolve_jobs, sample_groups, separability,
                             silhouette)
from backdoor_lens.errors import UserError
from backdoor_lens.models import PreActResNet18
from tests.helpers import run_in_process as run_analysis_in_process

MEAN = np.array([0.4914, 0.4822, 0.4465])
STD = np.array([0.247, 0.243, 0.261])


# --- independent computations --------------------------------------------------------------------

def distances(points):
    diff = points[:, None, :] - points[None, :, :]
    return np.sqrt((diff ** 2).sum(-1))


def hand_silhouette(points, a, b):
    """Rousseeuw's silhouette over the points of two groups, s = 0 for a group of one."""
    members = np.flatnonzero(a | b)
    d = distances(points[members])
    in_a = a[members]
    scores = []
    for i in range(len(members)):
        own = in_a == in_a[i]
        own_others = own.copy()
        own_others[i] = False
        if own_others.sum() == 0:
            scores.append(0.0)
            continue
        a_i = d[i, own_others].mean()
        b_i = d[i, ~own].mean()
        scores.append((b_i - a_i) / max(a_i, b_i))
    return float(np.mean(scores))


def hand_purity(points, members, k):
    d = distances(points)
    np.fill_diagonal(d, np.inf)
    return float(np.mean([members[np.argsort(d[i])[:k]].mean() for i in np.flatnonzero(members)]))


def blobs(rng, n_clean=100, n_poison=20, dims=20, gap=20.0):
    """Clean target-class samples around 0, poisoned ones around gap * e_0."""
    clean = rng.normal(size=(n_clean, dims))
    poison = rng.normal(size=(n_poison, dims))
    poison[:, 0] += gap
    points = np.vstack([clean, poison])
    is_poison = np.r_[np.zeros(n_clean, bool), np.ones(n_poison, bool)]
    return points, is_poison


# --- pure functions --------------------------------------------------------------------------------

def test_groups_separate_backdoor_from_cross_samples():
    labels = np.array([0, 0, 0, 3, 3, 5])
    original = np.array([0, 4, 0, 3, 3, 5])
    poison = np.array([0, 1, 1, 1, 0, 0], bool)
    # index 1: relabelled to the target; 2: a target-class sample with the trigger (still poisoned);
    # 3: flagged but label kept and not the target (WaNet cross); 4, 5: clean.
    assert sample_groups(labels, original, poison, 0).tolist() == [CLEAN, POISONED, POISONED, CROSS, CLEAN, CLEAN]
    # All-to-all attacks have no single target: a flagged sample with its own label is a cross one.
    assert sample_groups(labels, original, poison, None).tolist() == [CLEAN, POISONED, CROSS, CROSS, CLEAN, CLEAN]


def test_knn_purity_matches_brute_force():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(80, 5))
    members = np.zeros(80, bool)
    members[rng.choice(80, 12, replace=False)] = True
    for k in (1, 5, 10):
        purity, chance, k_used = knn_purity(points, members, k)
        assert k_used == k
        assert purity == pytest.approx(hand_purity(points, members, k))
        assert chance == pytest.approx(11 / 79)


def test_knn_purity_is_one_for_separated_and_chance_for_overlapping_groups():
    rng = np.random.default_rng(2)
    points, is_poison = blobs(rng)
    assert knn_purity(points, is_poison, 10)[0] == 1.0
    same = rng.normal(size=(3000, 10))
    members = np.zeros(3000, bool)
    members[rng.choice(3000, 300, replace=False)] = True
    purity, chance, _ = knn_purity(same, members, 10)
    assert abs(purity - chance) < 0.02, (purity, chance)


def test_knn_purity_edge_cases():
    points = np.arange(12, dtype=float).reshape(6, 2)
    assert knn_purity(points, np.zeros(6, bool)) == (None, None, 0)
    purity, _, k = knn_purity(points, np.r_[True, np.zeros(5, bool)], k=50)
    assert k == 5 and purity == 0.0  # k capped at N - 1; a lone poisoned point has no poisoned neighbour


@pytest.mark.parametrize("sizes", [(7, 13), (1, 6), (30, 30)])
def test_silhouette_matches_the_formula(sizes):
    rng = np.random.default_rng(sum(sizes))
    n_a, n_b = sizes
    points = np.vstack([rng.normal(size=(n_a, 3)), rng.normal(loc=1.5, size=(n_b, 3)), rng.normal(size=(5, 3))])
    a = np.r_[np.ones(n_a, bool), np.zeros(n_b + 5, bool)]
    b = np.r_[np.zeros(n_a, bool), np.ones(n_b, bool), np.zeros(5, bool)]  # the last five belong to neither
    assert silhouette(points, a, b) == pytest.approx(hand_silhouette(points, a, b), abs=1e-9)


def test_silhouette_undefined_cases():
    points = np.zeros((4, 2))
    assert silhouette(points, np.zeros(4, bool), np.ones(4, bool)) is None
    assert silhouette(points, np.r_[True, False, False, False], np.r_[False, True, False, False]) is None


def test_separability_compares_poisoned_with_the_target_class_only():
    rng = np.random.default_rng(3)
    # Poisoned samples (served label 0) sit exactly on class 1's cluster and far from class 0.
    target = rng.normal(size=(40, 4))
    other = rng.normal(size=(40, 4)) + np.array([30.0, 0, 0, 0])
    poisoned = rng.normal(size=(10, 4)) + np.array([30.0, 0, 0, 0])
    points = np.vstack([target, other, poisoned])
    labels = np.r_[np.zeros(40, int), np.ones(40, int), np.zeros(10, int)]
    groups = np.r_[np.full(80, CLEAN), np.full(10, POISONED)]
    metrics = separability(points, labels, groups, k=5)
    is_poisoned = groups == POISONED
    assert metrics["silhouette_poisoned_vs_target_clean"] == pytest.approx(
        hand_silhouette(points, is_poisoned, (labels == 0) & ~is_poisoned))
    assert metrics["silhouette_poisoned_vs_target_clean"] > 0.8
    assert metrics["knn_purity_poisoned"] == pytest.approx(hand_purity(points, is_poisoned, 5))
    assert metrics["knn_purity_poisoned"] < 0.6  # they mingle with class 1
    assert metrics["knn_purity_cross"] is None


def test_pca_keeps_the_top_principal_axes():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(30, 80)) * np.linspace(5, 0.1, 80)
    reduced, explained = reduce_pca(features, pca_dim=10)
    centred = features - features.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    assert reduced.shape == (30, 10)
    # Principal components are defined up to sign.
    assert np.allclose(np.abs(reduced), np.abs(u[:, :10] * s[:10]), atol=1e-3 * s[0])
    assert explained == pytest.approx((s[:10] ** 2).sum() / (s ** 2).sum(), rel=1e-4)
    assert reduce_pca(features[:6], pca_dim=50)[0].shape == (6, 6)  # at most N components
    assert reduce_pca(np.ones((8, 5)))[1] == 0.0  # a dead layer: nothing to keep, no crash


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_embedding_separates_separated_blobs(method):
    rng = np.random.default_rng(5)
    points, is_poison = blobs(rng, dims=200, gap=40.0)
    labels = np.zeros(len(points), int)  # poisoned ones served as the target 0
    original = np.where(is_poison, 3, 0)
    emb = compute_embedding(points, labels, original, is_poison, target=0, method=method, pca_dim=50, k=10)
    assert emb.coords.shape == (120, 2) and emb.reduced.shape == (120, 50)
    assert (emb.groups == POISONED).tolist() == is_poison.tolist()
    for space in ("embedding", "features"):
        assert emb.metrics[space]["knn_purity_poisoned"] == 1.0
        assert emb.metrics[space]["silhouette_poisoned_vs_target_clean"] > 0.5
    assert emb.metrics["embedding"]["silhouette_poisoned_vs_target_clean"] == pytest.approx(
        hand_silhouette(emb.coords, is_poison, ~is_poison))
    assert emb.metrics["features"]["silhouette_poisoned_vs_target_clean"] == pytest.approx(
        hand_silhouette(emb.reduced.astype(np.float64), is_poison, ~is_poison), abs=1e-5)


def test_too_few_samples_or_a_dead_layer_is_a_clear_error():
    with pytest.raises(UserError, match="at least 5 samples"):
        compute_embedding(np.zeros((4, 3)), [0] * 4, [0] * 4, [False] * 4, 0)
    with pytest.raises(UserError, match="same output for every sample"):
        compute_embedding(np.ones((20, 30)), [0] * 20, [0] * 20, [False] * 20, 0)


# --- threads -------------------------------------------------------------------------------------

def test_exact_neighbours_match_brute_force_with_each_point_first():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(40, 6)).astype(np.float32)
    points[7] = points[3]  # a duplicate: each of the two must still come first in its own list
    indices, dists = exact_neighbours(points, 5, n_jobs=2)
    d = distances(points.astype(np.float64))
    assert indices.shape == dists.shape == (40, 5)
    assert (indices[:, 0] == np.arange(40)).all() and (dists[:, 0] == 0).all()
    for i in range(40):
        others = np.delete(np.arange(40), i)
        expected = np.sort(d[i, others])[:4]
        np.testing.assert_allclose(dists[i, 1:], expected, rtol=1e-5, atol=1e-6)
        assert i not in indices[i, 1:]
        np.testing.assert_allclose(d[i, indices[i, 1:]], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, n_clean", [("tsne", 960), ("umap", 270)])
def test_embedding_does_not_depend_on_the_thread_count(method, n_clean):
    """Seeded and with exact neighbours, one thread and two give the same coordinates (with Annoy,
    openTSNE's choice from 1000 points, they did not: hence 1050 points for t-SNE)."""
    points, is_poison = blobs(np.random.default_rng(8), n_clean=n_clean, n_poison=n_clean // 10 - 6, dims=20, gap=6.0)
    labels, original = np.zeros(len(points), int), np.where(is_poison, 3, 0)
    one = compute_embedding(points, labels, original, is_poison, target=0, method=method, n_jobs=1)
    two = compute_embedding(points, labels, original, is_poison, target=0, method=method, n_jobs=2)
    np.testing.assert_array_equal(one.coords, two.coords)


@pytest.mark.parametrize("n, perplexity", [(150, 30.0), (40, 30.0), (31, 10.0)])
def test_tsne_equals_opentsne_exact_and_skips_pynndescent(n, perplexity):
    """embed_tsne hands openTSNE the exact neighbour index itself: the coordinates must be those of
    openTSNE's own TSNE(neighbors="exact").fit, perplexity capped or not, and pynndescent (whose
    import compiles numba code) must not be imported. Checked in a fresh interpreter, where no
    earlier test has imported it."""
    import subprocess
    import sys

    code = f"""
import sys, numpy as np
from backdoor_lens.stats.embedding import embed_tsne
points = np.random.default_rng(3).normal(size=({n}, 12))
ours = embed_tsne(points, seed=5, perplexity={perplexity}, n_jobs=1)
assert 'pynndescent' not in sys.modules, 'pynndescent imported'
from openTSNE import TSNE
capped = min({perplexity}, ({n} - 1) / 3)
theirs = TSNE(n_components=2, perplexity=capped, random_state=5, n_jobs=1, neighbors='exact',
              negative_gradient_method='bh', initialization='pca', verbose=False).fit(points)
np.testing.assert_array_equal(ours, np.asarray(theirs, dtype=np.float64))
print('same')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]


def test_n_jobs_zero_or_minus_one_is_every_core(tmp_path, monkeypatch):
    cores = available_cores()
    assert resolve_jobs(0) == resolve_jobs(-1) == resolve_jobs(None) == cores
    assert resolve_jobs(1) == 1 and resolve_jobs(10 ** 6) == cores
    # numba's cache: NUMBA_CACHE_DIR when set, else in the virtual environment, else the user's cache.
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "given"))
    assert numba_cache_dir() == tmp_path / "given" and (tmp_path / "given").is_dir()
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    monkeypatch.setattr("sys.base_prefix", "/usr")
    assert numba_cache_dir() == tmp_path / "venv" / "var" / "cache" / "numba"
    monkeypatch.setattr("sys.base_prefix", str(tmp_path / "venv"))  # no virtual environment
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert numba_cache_dir() == tmp_path / "xdg" / "backdoor_lens" / "numba"


# --- the scripts on miniature records ------------------------------------------------------------

def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def cifar_train(bb):
    images, labels = [], []
    for k in range(1, 6):
        with open(bb.data_dir / "cifar-10-batches-py" / f"data_batch_{k}", "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += batch[b"labels"]
    return np.concatenate(images), np.array(labels)


def hand_predict(state_dict, images):
    model = PreActResNet18(10)
    model.load_state_dict(state_dict)
    model.eval()
    x = torch.tensor(((np.stack(images) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def run_in_process(script: str, argv, capsys):
    """The analysis in this process (imports and numba compilation shared): (exit code, stdout, stderr)."""
    capsys.readouterr()
    return run_analysis_in_process(script, argv)

def check_against_csv_coordinates(rows, metrics, target, k):
    """The JSON's embedding metrics, recomputed by hand from the CSV's coordinates."""
    coords = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    poisoned = np.array([r["group"] == "poisoned" for r in rows])
    target_clean = np.array([r["group"] == "clean" and int(r["label"]) == target for r in rows])
    assert metrics["knn_purity_poisoned"] == pytest.approx(hand_purity(coords, poisoned, k), abs=1e-6)
    assert metrics["silhouette_poisoned_vs_target_clean"] == pytest.approx(
        hand_silhouette(coords, poisoned, target_clean), abs=1e-5)


def test_tsne_on_bd_train_has_one_row_per_sample_with_the_record_flags(bb, script, tmp_path):
    out = tmp_path / "out"
    result = script("visual_tsne.py", "--result_file_attack", bb.record_dir, "--output_dir", out, "--quiet",
                    "--knn", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "separation score" in result.stdout
    rows = read_csv(out / "tsne" / "tsne_points_attack.csv")
    raw = load_raw(bb.record_dir / "attack_result.pt")
    indicator = raw["bd_train"]["poison_indicator"]
    images, labels = cifar_train(bb)
    assert len(rows) == bb.n_train == len(indicator)
    assert sorted(int(r["index"]) for r in rows) == list(range(bb.n_train))
    for r in rows:
        i = int(r["index"])
        assert int(r["poison"]) == int(indicator[i])
        assert int(r["original_label"]) == labels[i]
        assert int(r["label"]) == (bb.target if indicator[i] else labels[i])
        assert r["group"] == ("poisoned" if indicator[i] else "clean")
    # Predictions from the model applied by hand: clean images, or the stored PNGs for poisoned ones.
    served = [np.asarray(Image.open(bb.record_dir / "bd_train_dataset" / str(labels[i]) / f"{i}.png"))
              if indicator[i] else images[i] for i in range(bb.n_train)]
    predicted = hand_predict(raw["model"], served)
    assert all(int(r["predicted"]) == predicted[int(r["index"])] for r in rows)
    report = json.loads((out / "tsne" / "tsne_separability.json").read_text())
    attack = report["models"]["attack"]
    assert attack["layer"] == "layer4.1.conv2" and attack["poisoned"] == len(bb.train_poison)
    check_against_csv_coordinates(rows, attack["embedding"], bb.target, k=3)
    assert attack["embedding"]["knn_purity_chance"] == pytest.approx((len(bb.train_poison) - 1) / (bb.n_train - 1))
    assert (out / "tsne" / "tsne.png").stat().st_size > 0
    assert json.loads((out / "tsne" / "run.json").read_text())["split"] == "bd_train"


def test_umap_on_a_stratified_subsample(bb, tmp_path, capsys):
    # In-process, so that umap's numba compilation is shared with the test above (about 10 s each).
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process("backdoor_lens.analyses.umap", ["--result_file_attack", bb.record_dir, "--output_dir", out,
                                                          "--quiet", "--n_sub", "30", "--target_layer_name",
                                                          "layer3.1.conv2", "--pool", "avg"], capsys)
    assert code == 0, stderr
    assert "UMAP separation score" in stdout
    rows = read_csv(out / "umap" / "umap_points_attack.csv")
    indicator = load_raw(bb.record_dir / "attack_result.pt")["bd_train"]["poison_indicator"]
    indices = [int(r["index"]) for r in rows]
    assert len(rows) == 30 and len(set(indices)) == 30
    assert [int(r["poison"]) for r in rows] == [int(indicator[i]) for i in indices]
    assert sum(int(r["poison"]) for r in rows) == 3  # stratified: 10% poisoned kept at 10%
    report = json.loads((out / "umap" / "umap_separability.json").read_text())["models"]["attack"]
    assert report["layer"] == "layer3.1.conv2" and report["feature_dim"] == 256  # channels, averaged
    check_against_csv_coordinates(rows, report["embedding"], bb.target, k=10)
    # --n_jobs left at 0: every core this process may use.
    assert json.loads((out / "umap" / "summary.json").read_text())["threads"] == available_cores()


def test_defense_is_embedded_beside_the_attack(bb, tmp_path, capsys):
    torch.manual_seed(7)
    defense = write_defense(tmp_path / "defense" / "ft", PreActResNet18(10).state_dict())
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process("backdoor_lens.analyses.tsne", ["--result_file_attack", bb.record_dir,
                                                          "--result_file_defense", defense, "--output_dir", out,
                                                          "--quiet", "--n_sub", "40"], capsys)
    assert code == 0, stderr
    assert "attack model" in stdout and "defense model" in stdout
    attack = read_csv(out / "tsne" / "tsne_points_attack.csv")
    defended = read_csv(out / "tsne" / "tsne_points_defense.csv")
    key = lambda r: (r["index"], r["label"], r["poison"])  # noqa: E731
    assert [key(r) for r in attack] == [key(r) for r in defended] and len(attack) == 40
    assert [r["x"] for r in attack] != [r["x"] for r in defended]  # different models, different features
    report = json.loads((out / "tsne" / "tsne_separability.json").read_text())
    assert set(report["models"]) == {"attack", "defense"}
    summary = json.loads((out / "tsne" / "summary.json").read_text())
    assert "silhouette_attack" in summary and "silhouette_defense" in summary


def test_record_without_bd_train_falls_back_to_mixed(tmp_path, script):
    bb = make_bb_root(tmp_path / "blind", n_train=30, n_test=40, with_bd_train=False)
    out = tmp_path / "out"
    result = script("visual_tsne.py", "--result_file_attack", bb.record_dir, "--output_dir", out, "--quiet",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "embedding mixed instead of bd_train" in result.stdout
    rows = read_csv(out / "tsne" / "tsne_points_attack.csv")
    poisoned = [int(r["index"]) for r in rows if r["poison"] == "1"]
    assert len(rows) == 40 and len(poisoned) == 4  # BackdoorBench's mixed: int(0.1 * 40) of the 40 served poisoned
    assert set(poisoned) <= set(bb.test_poison)
    assert json.loads((out / "tsne" / "run.json").read_text())["split"] == "mixed"


def test_clean_prototype_embeds_clean_test_without_a_poisoned_group(tmp_path, capsys):
    flags = make_record_kind(tmp_path / "proto", "prototype", n_train=30, n_test=30)
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process("backdoor_lens.analyses.umap", [*flags, "--output_dir", out, "--quiet"], capsys)
    assert code == 0, stderr
    assert "embedding clean_test" in stdout and "no poisoned samples" in stdout
    rows = read_csv(out / "umap" / "umap_points_attack.csv")
    assert len(rows) == 30 and all(r["poison"] == "0" and r["group"] == "clean" for r in rows)
    metrics = json.loads((out / "umap" / "umap_separability.json").read_text())["models"]["attack"]["embedding"]
    assert metrics["knn_purity_poisoned"] is None and metrics["silhouette_clean_classes"] is not None


@pytest.mark.parametrize("script", ["backdoor_lens.analyses.tsne", "backdoor_lens.analyses.umap"])
def test_bad_embedding_flag_is_one_line_and_leaves_nothing(bb, tmp_path, capsys, script):
    out = tmp_path / "out"
    code, _, stderr = run_in_process(script, ["--result_file_attack", bb.record_dir, "--output_dir", out, "--quiet",
                                              "--pca_dim", "0"], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--pca_dim 0 must be at least 1" in lines[0]
    assert not out.exists() or not any(out.rglob("*"))
    code, _, stderr = run_in_process(script, ["--result_file_attack", bb.record_dir, "--output_dir", out, "--quiet",
                                              "--n_jobs", "-2"], capsys)
    assert code == 2 and "--n_jobs -2 must be at least -1 (0 or -1: every core)" in stderr
    assert not out.exists() or not any(out.rglob("*"))


def test_cross_samples_are_a_group_of_their_own(tmp_path, capsys):
    """WaNet-style records flag 'cross' samples (indicator 1, label kept): neither clean nor backdoor."""
    bb = make_bb_root(tmp_path / "wanet", n_train=40, n_test=20, pratio=0.2)
    raw = load_raw(bb.record_dir / "attack_result.pt")
    entries = raw["bd_train"]["bd_data_container"]["data_dict"]
    cross = [i for i in bb.train_poison if int(entries[i]["other_info"][1]) != bb.target][:3]
    for i in cross:
        entries[i]["other_info"] = [entries[i]["other_info"][1], entries[i]["other_info"][1]]
    torch.save(raw, bb.record_dir / "attack_result.pt")
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process("backdoor_lens.analyses.tsne", ["--result_file_attack", bb.record_dir, "--output_dir", out,
                                                          "--quiet"], capsys)
    assert code == 0, stderr
    rows = {int(r["index"]): r for r in read_csv(out / "tsne" / "tsne_points_attack.csv")}
    assert sorted(i for i, r in rows.items() if r["group"] == "cross") == sorted(cross)
    assert sorted(i for i, r in rows.items() if r["group"] == "poisoned") == sorted(set(bb.train_poison) - set(cross))
    assert all(rows[i]["poison"] == "1" and rows[i]["label"] == rows[i]["original_label"] for i in cross)
    report = json.loads((out / "tsne" / "tsne_separability.json").read_text())["models"]["attack"]
    assert report["cross"] == 3 and report["poisoned"] == len(bb.train_poison) - 3
    assert report["embedding"]["knn_purity_cross_chance"] == pytest.approx(2 / 39)


def test_bd_test_alone_is_embedded_but_not_scored(bb, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_in_process("backdoor_lens.analyses.tsne", ["--result_file_attack", bb.record_dir, "--output_dir", out,
                                                          "--quiet", "--visual_dataset", "bd_test"], capsys)
    assert code == 0, stderr
    assert "only poisoned samples" in stdout and "use mixed" in stdout
    rows = read_csv(out / "tsne" / "tsne_points_attack.csv")
    assert sorted(int(r["index"]) for r in rows) == sorted(bb.test_poison)
    metrics = json.loads((out / "tsne" / "tsne_separability.json").read_text())["models"]["attack"]["embedding"]
    assert metrics["knn_purity_poisoned"] is None and metrics["silhouette_poisoned_vs_target_clean"] is None
