"""The Analysis declaration and the registry: the one list of analyses.

Each module of `backdoor_lens.analyses` declares one `ANALYSIS = Analysis(...)`: what it is
(name, title, reading guide), what it reads (splits in order of preference, whether it needs
poisoned samples), how the demo and the quick tests run it, and its functions:

    add_arguments(parser)            its own flags
    settings(args) -> Settings       the typed settings compute needs (below the CLI, no namespace)
    compute(ctx, settings) -> Result pure: model(s) and data in, a result out; no drawing, no files
    write(result, ctx) -> summary    figures (through backdoor_lens.plot) and CSV/JSON into ctx.out
    key_numbers(folder) -> rows      the report's key-number lines, read back from what write wrote

`Analysis.run(args)` ties them together: the context (record, models, output folder), compute,
write, summary.json and run.json. An analysis whose run cannot take this shape (the MPI landscape)
declares its own `run(args)` instead. The command line, the batch
runner, the report, the notebooks and the record-kind matrix all read this registry, so adding an
analysis is one module (and its test).

Modules outside the package join the registry through the environment variable
`BACKDOOR_LENS_ANALYSES` (comma-separated importable module names, each defining `ANALYSIS`):
a plug-in needs no edit of this package.
"""
import importlib
import os
import pkgutil
from dataclasses import dataclass, field, fields
from typing import Callable

from .errors import UserError

PLUGINS_VARIABLE = "BACKDOOR_LENS_ANALYSES"


@dataclass(frozen=True)
class Analysis:
    name: str  # the command (`backdoor-lens tac`) and the output folder (`visual/tac/`)
    title: str  # the report's section heading
    guide: str  # one line: how to read the figures
    shows: str  # the notebook's "this notebook shows ..."
    compute: Callable | None = None  # compute(ctx, settings) -> result
    write: Callable | None = None  # write(result, ctx) -> summary dict
    settings: Callable | None = None  # settings(args) -> typed settings (None: compute gets args)
    custom_run: Callable | None = None  # run(args) -> summary, for analyses outside compute/write
    add_arguments: Callable | None = None  # add_arguments(parser): the analysis's own flags
    # Splits the analysis reads, in order of preference; () for analyses of the weights alone.
    splits: tuple = ()
    # The --visual_dataset default: a split name, or "auto" (the first of `splits` the record has).
    default_split: str = "clean_test"
    needs_poison: bool = False  # refuses records and splits without poisoned samples
    compares: bool = False  # draws attack and defense side by side (the demo's defense pass runs it)
    demo_args: tuple = ()  # flags of the demo run (make demo, notebooks)
    quick_args: tuple = ()  # flags that make it finish in seconds on miniature records (tests)
    mpi_ranks: int = 0  # ranks the demo starts it with under mpirun (0: a plain process)
    on_blended_demo: bool = False  # also run on the demo's Blended record, for contrast
    key_numbers: Callable | None = None  # key_numbers(folder) -> [(label, text)]: the report's key numbers
    order: int = 100  # place in listings and the report (then by name)
    module: str = field(default="", compare=False)

    def run(self, args) -> dict:
        """Context, compute, write; summary.json and run.json; outputs moved into place."""
        if self.custom_run is not None:
            return self.custom_run(args)
        from .context import load_context

        settings = self.settings(args) if self.settings is not None else args
        with load_context(args, self.name, split=None, needs_poison=self.needs_poison) as ctx:
            result = self.compute(ctx, settings)
            summary = self.write(result, ctx)
            ctx.out.save_json("summary", summary)
            return ctx.finish(summary)

    @property
    def script(self) -> str:
        """The root-level script BackdoorBench's users type."""
        return f"visual_{self.name}.py"

    def main(self, argv=None) -> int:
        from .cli import run_declared

        return run_declared(self, argv)


def flag_settings(cls):
    """settings(args) for a Settings dataclass whose fields are flags of the same names."""
    def settings(args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    return settings


def _declared(module_name: str) -> Analysis:
    module = importlib.import_module(module_name)
    analysis = getattr(module, "ANALYSIS", None)
    if not isinstance(analysis, Analysis):
        raise UserError(f"module {module_name} declares no ANALYSIS = Analysis(...); "
                        f"check {PLUGINS_VARIABLE} or the module")
    if analysis.custom_run is None and (analysis.compute is None or analysis.write is None):
        raise UserError(f"analysis {analysis.name} in {module_name} declares neither compute and write nor its "
                        f"own run; declare compute=..., write=...")
    return analysis if analysis.module else _with_module(analysis, module_name)


def _with_module(analysis: Analysis, module_name: str) -> Analysis:
    from dataclasses import replace

    return replace(analysis, module=module_name)


def registry() -> dict:
    """{name: Analysis}: the package's analyses and the plug-ins, in their declared order."""
    from . import analyses as package

    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_"))
    found = [_declared(f"{package.__name__}.{name}") for name in names]
    plugins = [m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m.strip()]
    found += [_declared(name) for name in plugins]
    table = {}
    for analysis in sorted(found, key=lambda a: (a.order, a.name)):
        if analysis.name in table:
            raise UserError(f"two analyses are called {analysis.name} ({table[analysis.name].module} and "
                            f"{analysis.module}); rename one")
        table[analysis.name] = analysis
    return table


def get(name: str) -> Analysis:
    table = registry()
    if name not in table:
        raise UserError(f"no analysis called {name!r}; known: {', '.join(table)} (backdoor-lens list)")
    return table[name]
