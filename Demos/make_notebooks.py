"""Write Demos/Demo_<name>.ipynb, one per registered analysis, stored without outputs.

    python Demos/make_notebooks.py

Each notebook runs its analysis through the library (`backdoor_lens.analysis.get(name)`) on the
demo record with the analysis's declared demo arguments. The record and output folder can be
redirected with the environment variables BACKDOOR_LENS_RECORD and BACKDOOR_LENS_OUT (the tests do
this), and any flag overridden through BACKDOOR_LENS_OVERRIDES (a JSON object).
"""
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from backdoor_lens.analysis import registry  # noqa: E402


def flags_to_kwargs(flags) -> dict:
    """["--n_sub", "600", "--x=-1:1:5", "--quiet"] -> {"n_sub": "600", "x": "-1:1:5", "quiet": True}."""
    values, key = {}, None
    for item in map(str, flags):
        if item.startswith("--"):
            name, eq, value = item[2:].partition("=")
            key = None if eq else name
            values[name] = value if eq else True
        elif key is not None:
            values[key] = item
            key = None
    return values


def notebook_path(analysis) -> Path:
    return HERE / f"Demo_{analysis.name}.ipynb"


def notebook(analysis) -> nbformat.NotebookNode:
    kwargs = flags_to_kwargs(analysis.demo_args)
    arg_lines = "".join(f"    {k}={v!r},\n" for k, v in kwargs.items())
    cells = [
        nbformat.v4.new_markdown_cell(
            f"# {analysis.title} (`{analysis.name}`)\n\nThis notebook shows {analysis.shows}, on the embedded demo "
            f"record (`make demo` builds it: a PreAct-ResNet-18 backdoored with a BadNets patch on handwritten "
            f"digits).\n\nIt uses the library, the same code that `backdoor-lens {analysis.name} ...` and "
            f"`python {analysis.script} ...` run."),
        nbformat.v4.new_code_cell(
            "import json, os, sys\nfrom pathlib import Path\n\n"
            "ROOT = Path.cwd().parent if Path.cwd().name == 'Demos' else Path.cwd()\n"
            "sys.path.insert(0, str(ROOT))  # not needed once the package is installed (make installs it)\n"
            "RECORD = os.environ.get('BACKDOOR_LENS_RECORD', str(ROOT / 'record' / 'badnet_demo'))\n"
            "OUT = os.environ.get('BACKDOOR_LENS_OUT')  # None: outputs go to <record>/visual/\n"
            "# The tests shrink sample counts through this variable (a JSON object of flag values).\n"
            "OVERRIDES = json.loads(os.environ.get('BACKDOOR_LENS_OVERRIDES', '{}'))\n"
            f"from backdoor_lens.analysis import get\nfrom backdoor_lens.args import make_args\n\n"
            f"analysis = get({analysis.name!r})"),
        nbformat.v4.new_markdown_cell("Run the analysis with small sample counts (any command-line flag can be "
                                      "given here as a keyword argument):"),
        nbformat.v4.new_code_cell(
            f"settings = dict(\n{arg_lines})\nsettings.update(OVERRIDES)\n"
            "args = make_args(analysis.add_arguments, default_split=analysis.default_split, result_file_attack=RECORD,\n"
            "                 output_dir=OUT, quiet=True, **settings)\nsummary = analysis.run(args)\nsummary"),
        nbformat.v4.new_code_cell(
            "from IPython.display import Image, display\n\n"
            "for figure in sorted(Path(summary['output_dir']).glob('*.png')):\n"
            "    print(figure.name)\n    display(Image(filename=str(figure)))"),
        nbformat.v4.new_markdown_cell(f"## How to read it\n\n{analysis.guide}\n\nThe numbers behind the figures are "
                                      f"the CSV and JSON files in the output folder; `run.json` records the "
                                      f"arguments, versions and timing."),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main():
    for analysis in registry().values():
        path = notebook_path(analysis)
        nbformat.write(notebook(analysis), path)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
