"""The registry is the one list of analyses: a plug-in module joins the command line, the batch
runner, the report, the notebooks and the record-kind matrix with no other edit; the root scripts
are shims; `backdoor-lens list` names every analysis."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backdoor_lens.analysis import PLUGINS_VARIABLE, registry

ROOT = Path(__file__).resolve().parent.parent

TOY = '''
"""A toy analysis: how many samples of each class the split serves."""
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis
from backdoor_lens.plot.base import plt


def add_arguments(parser):
    parser.add_argument("--bar_colour", default="#3070b0")


@dataclass
class Counts:
    per_class: np.ndarray
    colour: str


def compute(ctx, args):
    split = ctx.use_split()
    return Counts(np.bincount(split.labels, minlength=ctx.num_classes), args.bar_colour)


def write(result, ctx):
    ctx.out.save_csv("toy_counts", [[c, int(n)] for c, n in enumerate(result.per_class)], header=["class", "samples"])
    fig, ax = plt.subplots()
    ax.bar(range(len(result.per_class)), result.per_class, color=result.colour)
    ax.set_title("samples per class")
    ctx.out.save_figure(fig, "toy_counts")
    return {"samples": int(result.per_class.sum())}


ANALYSIS = Analysis(name="toy", title="Toy class counts", guide="Bars: samples per class.",
                    shows="how many samples of each class the split serves", compute=compute, write=write,
                    add_arguments=add_arguments, splits=("clean_test",), quick_args=("--bar_colour", "red"))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_analysis.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(PLUGINS_VARIABLE, "toy_analysis")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return folder


def test_a_plugin_joins_runner_report_notebooks_and_matrix(plugin, bb, tmp_path):
    import shutil

    from Demos.make_notebooks import notebook
    from tests.bb_fixture import make_record_kind
    from tests.matrix import analyses, run_cell

    assert "toy" in registry() and "toy" in analyses()
    root = tmp_path / "copy"
    shutil.copytree(bb.root, root)
    record = root / "record" / bb.record_dir.name
    done = subprocess.run([sys.executable, "-m", "backdoor_lens", "all", str(record), "--only", "toy",
                           "--dataset_path", str(root / "data" / "cifar10")],
                          capture_output=True, text=True, env=dict(os.environ, MPLBACKEND="Agg"), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    counts = (record / "visual" / "toy" / "toy_counts.csv").read_text().splitlines()
    assert sum(int(line.split(",")[1]) for line in counts[1:]) == bb.n_test  # the whole clean test set
    page = (record / "visual" / "report.html").read_text()
    assert "id='toy'" in page and "Toy class counts" in page and "toy_counts" in page
    cells = notebook(registry()["toy"]).cells
    assert any("get('toy')" in cell.source for cell in cells)
    kind = make_record_kind(tmp_path / "kind", "attack")
    assert run_cell("toy", kind, tmp_path / "matrix_out")[0] == "ok"


def test_list_names_every_analysis_and_each_has_a_shim():
    done = subprocess.run([sys.executable, "-m", "backdoor_lens", "list"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert listed == list(registry())
    shims = {p.stem[len("visual_"):]: p for p in ROOT.glob("visual_*.py")}
    assert sorted(shims) == sorted(listed)
    for name, path in shims.items():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        assert len(lines) <= 10 and f'run_analysis("{name}")' in path.read_text(), path.name


def test_unknown_command_is_one_line():
    done = subprocess.run([sys.executable, "-m", "backdoor_lens", "nonsense"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "list" in done.stderr


def test_readme_table_has_one_row_per_analysis():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Scripts"):readme.index("## Record kinds")]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `visual_")]
    assert rows == [f"visual_{name}.py" for name in registry()]
