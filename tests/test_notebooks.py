"""Every registered analysis has a Demos/ notebook, and every notebook executes headless on the demo record."""
import json
from pathlib import Path

import nbformat
import pytest

from backdoor_lens.analysis import registry
from Demos.make_notebooks import flags_to_kwargs, notebook_path

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ROOT / "Demos"
ANALYSES = registry()


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


def test_every_notebook_belongs_to_an_analysis():
    expected = {notebook_path(a).name for a in ANALYSES.values()}
    assert {p.name for p in DEMOS.glob("Demo_*.ipynb")} == expected


@pytest.mark.parametrize("name", list(ANALYSES))
def test_notebook_executes(name, demo_record, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    path = notebook_path(ANALYSES[name])
    assert path.is_file(), f"{path.name} is missing: python Demos/make_notebooks.py writes it"
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "stored with outputs"
    monkeypatch.setenv("BACKDOOR_LENS_RECORD", str(demo_record))
    monkeypatch.setenv("BACKDOOR_LENS_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("BACKDOOR_LENS_OVERRIDES", json.dumps(flags_to_kwargs(ANALYSES[name].quick_args)))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DEMOS)}}).execute()
    figures = list(tmp_path.rglob("*.png"))
    assert figures, "the notebook wrote no figure"
    assert any(p.name == "run.json" for p in tmp_path.rglob("run.json"))
    shown = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
             if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert shown, "no figure displayed"
