"""Every registered analysis x every record kind: outputs, or exit 2 with one line; never a traceback.

Runs in-process (the analysis's own `main` with its command-line arguments) from a working directory
that is not the record's, on records whose stored paths point at a BackdoorBench root elsewhere.
"""
import json

import pytest

from tests.bb_fixture import RECORD_KINDS, make_record_kind
from backdoor_lens.analysis import registry
from tests.matrix import analyses, run_cell


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return {kind: make_record_kind(tmp_path_factory.mktemp(f"kind_{kind}"), kind) for kind in RECORD_KINDS}


@pytest.mark.parametrize("kind", RECORD_KINDS)
@pytest.mark.parametrize("script", analyses())
def test_cell(script, kind, kinds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, message = run_cell(script, kinds[kind], tmp_path / "out")
    if status == "refused":
        assert "needs" in message, message
        assert kind == "prototype", f"{script} refused a {kind} record: {message}"
    if kind == "prototype" and registry()[script].needs_poison:
        assert status == "refused"
    if status == "ok":
        run = json.loads(next((tmp_path / "out").rglob("run.json")).read_text())
        assert (run["defense"] is not None) == kind.startswith("defense")
        assert run["record_kind"] == ("prototype" if kind == "prototype" else "attack")
