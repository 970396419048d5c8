"""Every Demos/ notebook executes headless on the demo record, and every script has one."""
import json
from pathlib import Path

import nbformat
import pytest

from Demos.make_notebooks import NOTEBOOKS as SPEC
from tests.matrix import MATRIX_ARGS
from utils.script_info import flags_to_kwargs

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ROOT / "Demos"
NOTEBOOKS = sorted(DEMOS.glob("Demo_*.ipynb"))


@pytest.fixture(scope="session")
def demo_record(tmp_path_factory):
    """The cached demo record when `make demo` built it, else a quick 2-epoch build in a temporary folder."""
    cached = ROOT / "record" / "badnet_demo"
    if (cached / "demo_build.json").is_file():
        return cached
    from demo.build_demo import build
    root = tmp_path_factory.mktemp("demo_root")
    build("badnet_demo", "badnet", epochs=2, root=root)
    return root / "record" / "badnet_demo"


def test_every_script_has_a_notebook():
    scripts = {p.stem for p in ROOT.glob("visual_*.py")}
    covered = {module for _, module, _, _ in SPEC}
    assert scripts <= covered, scripts - covered
    written = {p.stem for p in NOTEBOOKS}
    assert {f"Demo_{name}" for name, module, _, _ in SPEC if module in scripts} <= written


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, demo_record, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "stored with outputs"
    monkeypatch.setenv("BACKDOOR_LENS_RECORD", str(demo_record))
    monkeypatch.setenv("BACKDOOR_LENS_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    script = next(module for name, module, _, _ in SPEC if f"Demo_{name}" == path.stem)
    monkeypatch.setenv("BACKDOOR_LENS_OVERRIDES", json.dumps(flags_to_kwargs(MATRIX_ARGS.get(script, []))))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DEMOS)}}).execute()
    figures = list(tmp_path.rglob("*.png"))
    assert figures, "the notebook wrote no figure"
    assert any(p.name == "run.json" for p in tmp_path.rglob("run.json"))
    shown = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
             if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert shown, "no figure displayed"
