"""Defaults sized for the device: fv, hessian and landscape take lighter cost defaults on a CPU.

For each: the flags left unset get the documented CPU values (and the GPU ones, unchanged from
before, when the device is CUDA), flags given are used as given, one line says so up front, and
summary.json / run.json record the values used (checked against the rule, written out here).
"""
import json

import pytest
import torch

from backdoor_lens.args import make_args
from tests.helpers import run_in_process


def as_gpu(monkeypatch, module):
    """Let the module's device rule (backdoor_lens.device.fill_device_defaults) see CUDA; settings()
    only asks for the device type. `module` names the analysis whose rule is exercised."""
    from backdoor_lens import device

    monkeypatch.setattr(device, "pick_device", lambda requested=None: torch.device("cuda"))


def read(out, name, file):
    return json.loads((out / name / file).read_text())


# --- fv ------------------------------------------------------------------------------------------

def fv_args(**values):
    from backdoor_lens.analyses import fv

    return make_args(fv.add_arguments, default_split=fv.ANALYSIS.default_split, result_file_attack="r", **values)


def test_fv_rule(monkeypatch, capsys):
    from backdoor_lens.analyses import fv

    args = fv_args(device="cpu")
    s = fv.settings(args)
    assert (s.steps, args.n_sub) == (128, 1000) and s.device_defaults == {"steps": 128, "n_sub": 1000}
    line = capsys.readouterr().out.strip()
    assert line.startswith("on a CPU: 128 optimisation steps, 1000 poisoned/clean pairs") and "--steps / --n_sub" in line
    args = fv_args(device="cpu", steps=7, n_sub=5)
    s = fv.settings(args)
    assert (s.steps, args.n_sub, s.device_defaults) == (7, 5, {}) and capsys.readouterr().out == ""
    as_gpu(monkeypatch, fv)
    args = fv_args(device="auto")
    s = fv.settings(args)
    assert (s.steps, args.n_sub) == (256, None) and capsys.readouterr().out == ""  # every pair, as before


def test_fv_run_records_what_it_used(bb, tmp_path, monkeypatch):
    from backdoor_lens.analyses import fv

    # The rule's values are checked above; here that a run uses what the rule gives and records it
    # (3 steps instead of 128 keep the test short).
    monkeypatch.setitem(fv.DEVICE_DEFAULTS, "cpu", {"steps": 3, "n_sub": 4})
    code, stdout, stderr = run_in_process("fv", ["--result_file_attack", bb.record_dir, "--output_dir", tmp_path / "a",
                                                 "--n_channels", "1", "--device", "cpu", "--quiet"])
    assert code == 0, stderr
    assert stdout.startswith("on a CPU: 3 optimisation steps, 4 poisoned/clean pairs")
    summary = read(tmp_path / "a", "fv", "summary.json")
    assert len(bb.train_poison) > 4 and summary["steps"] == 3 and summary["tac_pairs"] == 4
    assert summary["device_defaults"] == {"steps": 3, "n_sub": 4}
    run = read(tmp_path / "a", "fv", "run.json")
    assert run["arguments"]["steps"] == 3 and run["arguments"]["n_sub"] == 4 and run["poisoned_samples"] == 4
    code, stdout, stderr = run_in_process("fv", ["--result_file_attack", bb.record_dir, "--output_dir", tmp_path / "b",
                                                 "--n_channels", "1", "--steps", "2", "--n_sub", "3", "--device", "cpu",
                                                 "--quiet"])
    assert code == 0, stderr
    assert "on a CPU" not in stdout
    summary = read(tmp_path / "b", "fv", "summary.json")
    assert (summary["steps"], summary["tac_pairs"], summary["device_defaults"]) == (2, 3, {})
    assert read(tmp_path / "b", "fv", "run.json")["poisoned_samples"] == 3


# --- hessian -------------------------------------------------------------------------------------

COST = ("hessian_batches", "max_iter", "trace_probes", "lanczos_steps", "density_probes")


def hessian_args(**values):
    from backdoor_lens.analyses import hessian

    return make_args(hessian.add_arguments, result_file_attack="r", **values)


def test_hessian_rule(monkeypatch, capsys):
    from backdoor_lens.analyses import hessian

    s = hessian.settings(hessian_args(device="cpu"))
    assert [getattr(s, f) for f in COST] == [1, 10, 5, 8, 1] and s.batch_size == 64 and s.top_k == 3
    assert s.device_defaults == dict(zip(COST, [1, 10, 5, 8, 1]))
    line = capsys.readouterr().out.strip()
    assert line.startswith("on a CPU: 1 batch of 64 samples, 10 power iterations per eigenvalue, 5 trace probes")
    assert len(line.splitlines()) == 1 and "--max_iter" in line
    # A smaller --batch_size is kept; given flags are used as given.
    s = hessian.settings(hessian_args(device="cpu", batch_size=16, max_iter=40))
    assert s.batch_size == 16 and s.max_iter == 40 and "max_iter" not in s.device_defaults
    s = hessian.settings(hessian_args(device="cpu", hessian_batches=3, max_iter=2, trace_probes=2, lanczos_steps=4,
                                      density_probes=2))
    assert [getattr(s, f) for f in COST] == [3, 2, 2, 4, 2] and s.batch_size is None and s.device_defaults == {}
    capsys.readouterr()
    as_gpu(monkeypatch, hessian)
    s = hessian.settings(hessian_args(device="auto"))
    assert [getattr(s, f) for f in COST] == [2, 100, 20, 30, 2] and s.batch_size is None
    assert capsys.readouterr().out == ""


def test_hessian_run_records_what_it_used(bb, tmp_path):
    code, stdout, stderr = run_in_process("hessian", [
        "--result_file_attack", bb.record_dir, "--output_dir", tmp_path, "--visual_dataset", "clean_test",
        "--batch_size", "16", "--hessian_params", "linear", "--device", "cpu", "--quiet"])
    assert code == 0, stderr
    assert stdout.startswith("on a CPU: 1 batch of 16 samples")
    summary = read(tmp_path, "hessian", "summary.json")
    assert (summary["batches"], summary["samples"]) == (1, 16)
    assert (summary["max_iter"], summary["trace_probes_max"], summary["lanczos_steps"], summary["density_probes"]) == \
        (10, 5, 8, 1)
    assert summary["device_defaults"] == dict(zip(COST, [1, 10, 5, 8, 1]))
    # Hessian-vector products: at most top_k x max_iter power iterations, 5 probes, 8 Lanczos steps.
    assert summary["attack"]["trace_probes"] == 5 and len(summary["attack"]["ritz_values"]) == 1
    assert summary["attack"]["hessian_vector_products"] <= 3 * 10 + 5 + 8
    assert max(summary["attack"]["power_iterations"]) <= 10
    arguments = read(tmp_path, "hessian", "run.json")["arguments"]
    assert [arguments[f] for f in COST] == [1, 10, 5, 8, 1]
