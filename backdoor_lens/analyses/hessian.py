"""Hessian spectrum of the loss: top eigenvalues, trace and eigenvalue density.

The loss is the mean cross-entropy against the split's served labels (for bd_test: the attack
labels, i.e. the backdoor's loss) over `--hessian_batches` batches drawn at random from the
split, with the model in eval mode. Only Hessian-vector products are used (backdoor_lens/stats/hessian.py):
power iteration with deflation for the top eigenvalues, Hutchinson for the trace, stochastic
Lanczos quadrature for the density. Large top eigenvalues mean a sharp minimum.

Default split: clean_test, which every record kind has. BackdoorBench's script used training
data; pass `--visual_dataset bd_train` for the (poisoned) training loss the model was fitted to,
or bd_test for the curvature of the backdoor's loss.
Cost: a Hessian-vector product over all parameters of a PreAct-ResNet-18 costs about 6-8 forward
passes of its samples (measured on 2 CPU cores); the defaults ask for up to 380 products (3 x 100
power iterations, 20 trace probes, 2 x 30 Lanczos steps) over 2 batches of --batch_size (256
samples): minutes on a GPU, one to two hours on 2 CPU cores. So a CPU, for the flags left unset,
takes one batch of at most 64 samples, 10 power iterations per eigenvalue, 5 trace probes and one
density probe of 8 Lanczos steps: at most 43 products, about 3 to 4 minutes there (52 products took
8 minutes on 2 cores shared with other jobs, about one core's worth) (DEVICE_DEFAULTS).
The run says so up front; flags given on the command line are used as given. Restricting the
parameters (--hessian_params layer4,linear) cuts the cost of each product further.
"""
import itertools
from dataclasses import dataclass

import numpy as np

from backdoor_lens.analysis import Analysis
from backdoor_lens.device import fill_device_defaults
from backdoor_lens.errors import UserError
from backdoor_lens.plot.hessian import hessian_figure
from backdoor_lens.report.numbers import fmt, read_summary
from backdoor_lens.stats.hessian import compute_hessian_spectrum, select_parameters


def add_arguments(parser):
    group = parser.add_argument_group("hessian")
    group.add_argument("--hessian_batches", type=int, default=None,
                       help="batches of --batch_size samples, drawn at random from the split, that the loss averages "
                            "over (default 2 on a GPU; on a CPU one batch of at most 64 samples)")
    group.add_argument("--hessian_params",
                       help="comma-separated module or parameter names (e.g. layer4,linear): the Hessian block of "
                            "those parameters only (default: all parameters)")
    group.add_argument("--top_k", type=int, default=3, help="how many top eigenvalues (power iteration with deflation)")
    group.add_argument("--tol", type=float, default=1e-3,
                       help="power iteration stops when |Hv - lambda v| <= tol |lambda| "
                            "(then an eigenvalue lies within tol |lambda|)")
    group.add_argument("--max_iter", type=int, default=None,
                       help="power iterations per eigenvalue at most (default 100 on a GPU, 10 on a CPU)")
    group.add_argument("--trace_probes", type=int, default=None,
                       help="Rademacher probes for Hutchinson's trace, at most (default 20 on a GPU, 5 on a CPU)")
    group.add_argument("--trace_tol", type=float,
                       help="stop adding trace probes once the standard error is below trace_tol x |trace|")
    group.add_argument("--lanczos_steps", type=int, default=None,
                       help="Lanczos steps per density probe (memory: steps x parameters floats; default 30 on a GPU, "
                            "8 on a CPU)")
    group.add_argument("--density_probes", type=int, default=None,
                       help="random starting vectors for the density (default 2 on a GPU, 1 on a CPU)")
    group.add_argument("--sigma", type=float, default=0.005,
                       help="Gaussian broadening of the density, relative to the spectrum's width")
    group.add_argument("--recompute_graph", action="store_true",
                       help="recompute the gradient graph for every product (less memory, about twice the time)")


@dataclass(frozen=True)
class Settings:
    hessian_batches: int
    hessian_params: str | None  # as given: comma-separated module or parameter names
    top_k: int
    tol: float
    max_iter: int
    trace_probes: int
    trace_tol: float | None
    lanczos_steps: int
    density_probes: int
    sigma: float
    recompute_graph: bool
    seed: int
    batch_size: int | None = None  # samples per batch; None: --batch_size
    device_defaults: dict = None  # the cost flags left unset, with the values the device rule gave them


# The cost flags a run leaves unset, by device (module docstring); on a CPU the one batch holds at
# most CPU_SAMPLES samples (fewer when --batch_size is smaller).
DEVICE_DEFAULTS = {"gpu": {"hessian_batches": 2, "max_iter": 100, "trace_probes": 20, "lanczos_steps": 30,
                           "density_probes": 2},
                   "cpu": {"hessian_batches": 1, "max_iter": 10, "trace_probes": 5, "lanczos_steps": 8,
                           "density_probes": 1}}
CPU_SAMPLES = 64
WHAT = {"max_iter": "power iterations per eigenvalue", "trace_probes": "trace probes", "lanczos_steps": "Lanczos steps",
        "density_probes": "density probe"}


def apply_device_defaults(args) -> tuple[dict, int | None]:
    """Give the cost flags left unset (None) this device's values, in `args` itself (run.json records
    the arguments). Returns ({flag: value} of the flags filled, the batch size when the CPU rule sets
    it, else None); on a CPU prints one line saying what was chosen and which flags change it."""
    filled, kind = fill_device_defaults(args, DEVICE_DEFAULTS)
    batch_size = min(args.batch_size, CPU_SAMPLES) if kind == "cpu" and "hessian_batches" in filled else None
    if kind == "cpu" and filled:
        gpu = DEVICE_DEFAULTS["gpu"]
        ours = [f"1 batch of {batch_size} samples" if k == "hessian_batches" else f"{v} {WHAT[k]}"
                for k, v in filled.items()]
        theirs = [f"{gpu[k]} batches of --batch_size" if k == "hessian_batches" else str(gpu[k]) for k in filled]
        print(f"on a CPU: {', '.join(ours)} (on a GPU {', '.join(theirs)}); "
              f"set {' / '.join('--' + k for k in filled)} for more", flush=True)
    return filled, batch_size


def settings(args) -> Settings:
    filled, batch_size = apply_device_defaults(args)
    for flag in ("hessian_batches", "top_k", "max_iter", "trace_probes", "lanczos_steps", "density_probes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if not args.tol > 0 or not args.sigma > 0 or (args.trace_tol is not None and not args.trace_tol > 0):
        raise UserError("--tol, --sigma and --trace_tol must be positive")
    return Settings(args.hessian_batches, args.hessian_params, args.top_k, args.tol, args.max_iter, args.trace_probes,
                    args.trace_tol, args.lanczos_steps, args.density_probes, args.sigma, bool(args.recompute_graph),
                    args.seed, batch_size, filled)


@dataclass
class HessianResult:
    record: str
    split: str
    samples: int
    batches: int
    settings: Settings
    spectra: dict  # {model label: HessianSpectrum}


def draw_batches(ctx, split, count: int, batch_size: int | None = None):
    """The first `count` batches (of batch_size, default --batch_size) of a shuffled pass (seeded):
    a random sample of the split."""
    loader = ctx.loader(split, shuffle=True, batch_size=batch_size)
    return [(x.to(ctx.device), y.to(ctx.device)) for x, y, *_ in itertools.islice(loader, count)]


def prefixes(names: str | None, model):
    """The --hessian_params names, each checked to hold a parameter of the model; None for all."""
    if not names:
        return None
    names = [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        if not select_parameters(model, [name]):
            modules = [n for n, m in model.named_children()]
            raise UserError(f"--hessian_params: no parameter lies in {name!r}; top-level modules: {', '.join(modules)}")
    return names


def compute(ctx, s: Settings) -> HessianResult:
    split = ctx.use_split()
    batches = draw_batches(ctx, split, s.hessian_batches, s.batch_size)
    spectra = {label: compute_hessian_spectrum(
        model, batches, top_k=s.top_k, tol=s.tol, max_iter=s.max_iter, trace_probes=s.trace_probes,
        trace_tol=s.trace_tol, lanczos_steps=s.lanczos_steps, density_probes=s.density_probes, sigma_rel=s.sigma,
        seed=s.seed, cache_graph=not s.recompute_graph, param_prefixes=prefixes(s.hessian_params, model))
        for label, model in ctx.models.items()}
    return HessianResult(ctx.record.name, split.name, sum(len(y) for _, y in batches), len(batches), s, spectra)


def write(result: HessianResult, ctx) -> dict:
    s = result.settings
    summary = {"split": result.split, "samples": result.samples, "batches": result.batches,
               "parameters_analysed": s.hessian_params or "all", "tol": s.tol, "top_k": s.top_k,
               "max_iter": s.max_iter, "trace_probes_max": s.trace_probes, "lanczos_steps": s.lanczos_steps,
               "density_probes": s.density_probes, "device_defaults": s.device_defaults or {}}
    eigen_rows, trace_rows, density_columns = [], [], {}
    for label, spectrum in result.spectra.items():
        top = spectrum.top
        for rank, (value, steps, done) in enumerate(zip(top.eigenvalues, top.iterations, top.converged)):
            eigen_rows.append([label, rank + 1, float(value), steps, done])
        trace_rows.append([label, spectrum.trace.trace, spectrum.trace.stderr, spectrum.trace.probes, spectrum.dim])
        density_columns[f"grid_{label}"] = spectrum.density.grid
        density_columns[f"density_{label}"] = spectrum.density.density
        summary[label] = {
            "top_eigenvalues": top.eigenvalues.tolist(), "power_iterations": top.iterations,
            "converged": top.converged, "trace": spectrum.trace.trace, "trace_stderr": spectrum.trace.stderr,
            "trace_probes": spectrum.trace.probes, "parameters": spectrum.dim,
            "hessian_vector_products": spectrum.products, "density_sigma": spectrum.density.sigma,
            "ritz_values": [n.tolist() for n in spectrum.density.nodes],
            "ritz_weights": [w.tolist() for w in spectrum.density.weights]}
        summary[f"top_eigenvalue_{label}"] = float(top.eigenvalues[0])
        missed = top.converged.count(False)
        unconverged = f" ({missed} not converged in {s.max_iter} iterations)" if missed else ""
        print(f"{label} model on {result.split} ({result.samples} samples, {result.batches} batches, {spectrum.dim} "
              f"parameters): top eigenvalues {', '.join(f'{v:.6g}' for v in top.eigenvalues)} "
              f"(descending, tol {s.tol:g}){unconverged}; trace {spectrum.trace.trace:.6g} "
              f"+- {spectrum.trace.stderr:.2g} ({spectrum.trace.probes} probes)")
    ctx.out.save_csv("hessian_eigenvalues", eigen_rows, header=["model", "rank", "eigenvalue", "power_iterations",
                                                                "converged"])
    ctx.out.save_csv("hessian_trace", trace_rows, header=["model", "trace", "stderr", "probes", "parameters"])
    ctx.out.save_csv("hessian_density", np.column_stack(list(density_columns.values())).tolist(),
                     header=list(density_columns))
    ctx.out.save_figure(hessian_figure(result.spectra, result.record, result.split, result.samples),
                        "hessian_density")
    return summary


def key_numbers(folder) -> list:
    s = read_summary(folder)
    return [("Hessian top eigenvalue", ", ".join(f"{k[len('top_eigenvalue_'):]} {fmt(v)}" for k, v in s.items()
                                                 if k.startswith("top_eigenvalue_")))] if s else []


ANALYSIS = Analysis(
    name="hessian", title="Hessian spectrum", order=14,
    guide="The top eigenvalues measure sharpness; the density shows how many directions are curved.",
    shows="the eigenvalue spectrum of the loss Hessian",
    compute=compute, write=write, settings=settings, add_arguments=add_arguments, key_numbers=key_numbers,
    splits=("clean_test", "bd_test", "mixed", "bd_train", "clean_train", "subset"), default_split="clean_test",
    compares=True,
    demo_args=("--n_sub", "16", "--batch_size", "8", "--hessian_batches", "2", "--hessian_params",
               "layer4.1.conv2,linear", "--top_k", "2", "--tol", "1e-2", "--max_iter", "15", "--trace_probes", "8",
               "--lanczos_steps", "12", "--density_probes", "1"),
    quick_args=("--n_sub", "8", "--batch_size", "8", "--hessian_batches", "1", "--hessian_params", "linear",
                "--top_k", "1", "--max_iter", "5", "--trace_probes", "2", "--lanczos_steps", "3",
                "--density_probes", "1"))
