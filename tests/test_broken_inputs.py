"""Every analysis x a table of broken and hostile inputs: exit 2, one line, nothing left behind.

For each cell the analysis runs in-process, as its command line would, on a miniature record that
has been broken in one way. The promise checked is the README's: one line naming what is wrong,
exit code 2, no traceback, no output folder (neither under --output_dir nor inside the record),
the record's files byte for byte unchanged, and no code run from any pickle (a hostile file
creates a marker file when unpickled the unsafe way; the marker must never appear).
"""
import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.bb_fixture import load_raw, make_bb_root
from backdoor_lens.analysis import registry
from tests.helpers import run_in_process

ANALYSES = registry()


class _Hostile:
    """Unpickled the unsafe way, this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tree_digest(folder: Path) -> dict:
    """Every path under folder (files hashed, links by their target), to see any change at all."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            digest[key] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[key] = "dir"
    return digest


def _break(kind: str, bb, marker: Path, tmp: Path) -> list:
    """Break the fresh miniature root in one way; returns extra command-line flags for the case."""
    record, data = bb.record_dir, bb.data_dir / "cifar-10-batches-py"
    if kind == "hostile_record":
        with open(record / "attack_result.pt", "wb") as handle:
            pickle.dump({"model": _Hostile(marker)}, handle)
    elif kind == "hostile_dataset_via_record":
        # --dataset_path not given: the record's own data_path chooses the folder.
        for name in ["test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]:
            with open(data / name, "wb") as handle:
                pickle.dump({b"data": _Hostile(marker), b"labels": []}, handle)
        return ["--no_dataset_path"]
    elif kind == "truncated_batch":
        for name in ["test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]:
            raw = (data / name).read_bytes()
            (data / name).write_bytes(raw[: len(raw) // 3])
    elif kind == "corrupt_png":
        for png in list((record / "bd_train_dataset").rglob("*.png")) + list((record / "bd_test_dataset").rglob("*.png")):
            png.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif kind == "model_not_state_dict":
        raw = load_raw(record / "attack_result.pt")
        raw["model"] = "weights went missing"
        torch.save(raw, record / "attack_result.pt")
    elif kind == "dangling_symlink":
        (record / "attack_result.pt").unlink()
        (record / "attack_result.pt").symlink_to(tmp / "nowhere" / "attack_result.pt")
    elif kind == "output_dir_is_file":
        target = tmp / "a_file"
        target.write_text("not a folder")
        return ["--output_dir", str(target)]
    elif kind == "yaml_wrong_type":
        yaml = tmp / "settings.yaml"
        yaml.write_text("batch_size: 2.5\n")
        return ["--yaml_path", str(yaml)]
    elif kind == "yaml_turns_on_trust":
        with open(record / "attack_result.pt", "wb") as handle:
            pickle.dump({"model": _Hostile(marker)}, handle)
        yaml = tmp / "settings.yaml"
        yaml.write_text("trust_record: true\n")
        return ["--yaml_path", str(yaml)]
    elif kind == "nonsense_split":
        return ["--visual_dataset", "nonsense"]
    elif kind == "negative_seed":
        return ["--seed", "-1"]
    else:
        raise ValueError(kind)
    return []


CASES = ("hostile_record", "hostile_dataset_via_record", "truncated_batch", "corrupt_png", "model_not_state_dict",
         "dangling_symlink", "output_dir_is_file", "yaml_wrong_type", "yaml_turns_on_trust", "nonsense_split",
         "negative_seed")
DATA_CASES = {"hostile_dataset_via_record", "truncated_batch", "corrupt_png"}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """One miniature BackdoorBench root per case, broken once and shared by every analysis."""
    roots = {}
    for kind in CASES:
        tmp = tmp_path_factory.mktemp(f"broken_{kind}")
        bb = make_bb_root(tmp / "bb", n_train=30, n_test=20)
        marker = tmp / "CODE_RAN"
        flags = _break(kind, bb, marker, tmp)
        roots[kind] = (bb, marker, flags)
    return roots


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("script", list(ANALYSES))
def test_broken_input(script, case, broken, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bb, marker, flags = broken[case]
    out = tmp_path / "out"
    argv = ["--result_file_attack", str(bb.record_dir), "--dataset_path", str(bb.data_dir)]
    extra = list(flags)
    if "--no_dataset_path" in extra:
        extra.remove("--no_dataset_path")
        argv = argv[:2]
    if "--output_dir" not in extra:
        extra += ["--output_dir", str(out)]
    analysis = ANALYSES[script]
    if case == "corrupt_png" and analysis.default_split == "clean_test" and analysis.splits:
        extra += ["--visual_dataset", "bd_test"]  # its default split has no poisoned image to break
    argv += list(analysis.quick_args) + extra + ["--quiet", "--device", "cpu"]
    before = _tree_digest(bb.root)
    code, _, stderr = run_in_process(script, argv)
    assert not marker.exists(), f"{script} ran code from a pickle in case {case}"
    assert _tree_digest(bb.root) == before, f"{script} changed the record's folder in case {case}"
    if case in DATA_CASES and not analysis.splits and code == 0:
        return  # nothing of the data is read: finishing is right
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"{script} exited {code} on {case}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"{script} printed {len(lines)} lines on {case}:\n{stderr}"
    left = [p for p in out.rglob("*")] if out.exists() else []
    assert not left, f"{script} left {left[:3]} behind on {case}"
