"""visual_metric.py and visual_cm.py against independent hand computations, and bad input."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bb_fixture import CIFAR_NAMES, load_raw, make_bb_root
from backdoor_lens.models import PreActResNet18

MEAN = np.array([0.4914, 0.4822, 0.4465])
STD = np.array([0.247, 0.243, 0.261])


def hand_predict(bb, images):
    """Independent of backdoor_lens: the state_dict straight from the file, images normalised by hand."""
    raw = load_raw(bb.record_dir / "attack_result.pt")
    model = PreActResNet18(10)
    model.load_state_dict(raw["model"])
    model.eval()
    x = torch.tensor(((np.stack(images) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def cifar_test(bb):
    import pickle
    with open(bb.data_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(batch[b"labels"])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_metric_matches_hand_computation(bb, script, tmp_path):
    out = tmp_path / "out"
    result = script("visual_metric.py", "--result_file_attack", bb.record_dir, "--output_dir", out,
                    "--device", "cpu", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = read_csv(out / "metric" / "metric_summary.csv")[0]
    images, labels = cifar_test(bb)
    acc = (hand_predict(bb, list(images)) == labels).mean()
    pngs = [np.asarray(Image.open(bb.record_dir / "bd_test_dataset" / str(labels[i]) / f"{i}.png"))
            for i in bb.test_poison]
    pred = hand_predict(bb, pngs)
    assert float(row["clean_accuracy_attack"]) == pytest.approx(acc)
    assert float(row["asr_attack"]) == pytest.approx((pred == bb.target).mean())
    assert float(row["ra_attack"]) == pytest.approx((pred == labels[bb.test_poison]).mean())
    assert (out / "metric" / "metric_radar.png").stat().st_size > 0
    run = json.loads((out / "metric" / "run.json").read_text())
    assert run["versions"]["torch"] and run["seconds"] >= 0


def test_metric_with_defense_writes_der_and_rir(bb, script, tmp_path):
    torch.manual_seed(3)
    defense_dir = tmp_path / "defense" / "ft"
    defense_dir.mkdir(parents=True)
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": PreActResNet18(10).state_dict()},
               defense_dir / "defense_result.pt")
    result = script("visual_metric.py", "--result_file_attack", bb.record_dir, "--result_file_defense",
                    defense_dir, "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    row = read_csv(defense_dir / "visual" / "metric" / "metric_summary.csv")[0]
    a = {k: float(row[f"{k}_attack"]) for k in ("clean_accuracy", "asr", "ra")}
    d = {k: float(row[f"{k}_defense"]) for k in ("clean_accuracy", "asr", "ra")}
    drop = max(0, a["clean_accuracy"] - d["clean_accuracy"])
    assert float(row["der"]) == pytest.approx((max(0, a["asr"] - d["asr"]) - drop + 1) / 2)
    assert float(row["rir"]) == pytest.approx((max(0, d["ra"] - a["ra"]) - drop + 1) / 2)


def test_confusion_matrix_matches_hand_counts(bb, script, tmp_path):
    out = tmp_path / "cm"
    result = script("visual_cm.py", "--result_file_attack", bb.record_dir / "attack_result.pt",
                    "--visual_dataset", "clean_test", "--output_dir", out, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    images, labels = cifar_test(bb)
    pred = hand_predict(bb, list(images))
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (labels, pred), 1)
    rows = read_csv(out / "cm" / "confusion_matrix_attack.csv")
    got = np.array([[int(r[name]) for name in CIFAR_NAMES] for r in rows])
    assert (got == expected).all()
    assert [r["label\\prediction"] for r in rows] == CIFAR_NAMES


def test_default_output_goes_into_the_record(tmp_path, script):
    bb = make_bb_root(tmp_path, n_train=20, n_test=20)
    result = script("visual_cm.py", "--result_file_attack", bb.record_dir, "--quiet", "--n_sub", "10")
    assert result.returncode == 0, result.stderr
    assert (bb.record_dir / "visual" / "cm" / "confusion_matrix.png").is_file()


# --- bad input: one clear line, exit 2, no traceback, no partial output -------------------------

def bad_input_cases(bb, tmp_path):
    truncated = tmp_path / "trunc" / "attack_result.pt"
    truncated.parent.mkdir()
    truncated.write_bytes((bb.record_dir / "attack_result.pt").read_bytes()[:3000])
    text = tmp_path / "text" / "attack_result.pt"
    text.parent.mkdir()
    text.write_text("hello")
    zoo = tmp_path / "zoo"
    shutil.copytree(bb.record_dir, zoo / "record" / "r")
    raw = load_raw(zoo / "record" / "r" / "attack_result.pt")
    raw["model_name"] = "lenet9000"
    torch.save(raw, zoo / "record" / "r" / "attack_result.pt")
    mismatch = tmp_path / "mismatch"
    shutil.copytree(bb.record_dir, mismatch / "record" / "r")
    raw = load_raw(mismatch / "record" / "r" / "attack_result.pt")
    raw["model"].pop("layer1.0.conv1.weight")
    torch.save(raw, mismatch / "record" / "r" / "attack_result.pt")
    rec = str(bb.record_dir)
    data = ["--dataset_path", str(bb.data_dir)]
    return {
        "missing folder": (["--result_file_attack", str(tmp_path / "no_such_record")], "does not exist"),
        "missing file": (["--result_file_attack", str(tmp_path / "attack_result.pt")], "does not exist"),
        "truncated pt": (["--result_file_attack", str(truncated)], "not a readable torch file"),
        "non-pickle pt": (["--result_file_attack", str(text)], "not a readable torch file"),
        "unknown model": (["--result_file_attack", str(zoo / "record" / "r")] + data, "not in the zoo"),
        "state_dict mismatch": (["--result_file_attack", str(mismatch / "record" / "r")] + data,
                                "missing keys layer1.0.conv1.weight"),
        "missing dataset": (["--result_file_attack", rec, "--dataset_path", str(tmp_path / "nodata")], "not found"),
        "unknown split": (["--result_file_attack", rec, "--visual_dataset", "everything"], "unknown --visual_dataset"),
        "target out of range": (["--result_file_attack", rec, "--target_class", "10"], "out of range"),
        "n_sub 0": (["--result_file_attack", rec, "--n_sub", "0"], "at least 1"),
        "empty after filter": (["--result_file_attack", rec, "--visual_dataset", "bd_test", "--c_sub", "1",
                                "--target_class", "5"], "no samples after filtering"),
        "unknown layer": (["--result_file_attack", rec, "--target_layer_name", "layer9.conv"], "valid names include"),
        "no record": ([], "no record given"),
    }


CASES = ["missing folder", "missing file", "truncated pt", "non-pickle pt", "unknown model", "state_dict mismatch",
         "missing dataset", "unknown split", "target out of range", "n_sub 0", "empty after filter", "unknown layer",
         "no record"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clear_line(bb, tmp_path, script, case):
    args, message = bad_input_cases(bb, tmp_path)[case]
    out = tmp_path / "out"
    result = script("visual_cm.py", *args, "--output_dir", out, "--quiet", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
