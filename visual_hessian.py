"""Hessian spectrum of the loss: top eigenvalues, trace and eigenvalue density.

The loss is the mean cross-entropy against the split's served labels (for bd_test: the attack
labels, i.e. the backdoor's loss) over `--hessian_batches` batches drawn at random from the
split, with the model in eval mode. Only Hessian-vector products are used (utils/hessian.py):
power iteration with deflation for the top eigenvalues, Hutchinson for the trace, stochastic
Lanczos quadrature for the density. Large top eigenvalues mean a sharp minimum.

Default split: clean_test, which every record kind has. BackdoorBench's script used training
data; pass `--visual_dataset bd_train` for the (poisoned) training loss the model was fitted to,
or bd_test for the curvature of the backdoor's loss.
Cost: each product is about three forward passes over the chosen batches; on a CPU restrict the
parameters with --hessian_params (e.g. layer4,linear) or use few, small batches.
"""
import itertools

import numpy as np

from utils.cli import main
from utils.context import load_context
from utils.errors import UserError
from utils.hessian import compute_hessian_spectrum, select_parameters
from utils.plotting import side_by_side

DEMO_ARGS = ["--n_sub", "16", "--batch_size", "8", "--hessian_batches", "2", "--hessian_params", "layer4.1.conv2,linear",
             "--top_k", "2", "--tol", "1e-2", "--max_iter", "15", "--trace_probes", "8", "--lanczos_steps", "12",
             "--density_probes", "1"]


def add_arguments(parser):
    group = parser.add_argument_group("hessian")
    group.add_argument("--hessian_batches", type=int, default=2,
                       help="batches of --batch_size samples, drawn at random from the split, that the loss averages "
                            "over")
    group.add_argument("--hessian_params",
                       help="comma-separated module or parameter names (e.g. layer4,linear): the Hessian block of "
                            "those parameters only (default: all parameters)")
    group.add_argument("--top_k", type=int, default=3, help="how many top eigenvalues (power iteration with deflation)")
    group.add_argument("--tol", type=float, default=1e-3,
                       help="power iteration stops when |Hv - lambda v| <= tol |lambda| "
                            "(then an eigenvalue lies within tol |lambda|)")
    group.add_argument("--max_iter", type=int, default=100, help="power iterations per eigenvalue at most")
    group.add_argument("--trace_probes", type=int, default=20, help="Rademacher probes for Hutchinson's trace (at most)")
    group.add_argument("--trace_tol", type=float,
                       help="stop adding trace probes once the standard error is below trace_tol x |trace|")
    group.add_argument("--lanczos_steps", type=int, default=30,
                       help="Lanczos steps per density probe (memory: steps x parameters floats)")
    group.add_argument("--density_probes", type=int, default=2, help="random starting vectors for the density")
    group.add_argument("--sigma", type=float, default=0.005,
                       help="Gaussian broadening of the density, relative to the spectrum's width")
    group.add_argument("--recompute_graph", action="store_true",
                       help="recompute the gradient graph for every product (less memory, about twice the time)")


def validate(args):
    for flag in ("hessian_batches", "top_k", "max_iter", "trace_probes", "lanczos_steps", "density_probes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if not args.tol > 0 or not args.sigma > 0 or (args.trace_tol is not None and not args.trace_tol > 0):
        raise UserError("--tol, --sigma and --trace_tol must be positive")


def draw_batches(ctx, count: int):
    """The first `count` batches of a shuffled pass (seeded): a random sample of the split."""
    loader = ctx.loader(ctx.split, shuffle=True)
    return [(x.to(ctx.device), y.to(ctx.device)) for x, y, *_ in itertools.islice(loader, count)]


def prefixes(args, model):
    if not args.hessian_params:
        return None
    names = [n.strip() for n in args.hessian_params.split(",") if n.strip()]
    for name in names:
        if not select_parameters(model, [name]):
            modules = [n for n, m in model.named_children()]
            raise UserError(f"--hessian_params: no parameter lies in {name!r}; top-level modules: {', '.join(modules)}")
    return names


def draw_density(ax, spectrum, label: str):
    density = spectrum.density
    floor = max(density.density.max() * 1e-8, 1e-12)
    ax.semilogy(density.grid, np.maximum(density.density, floor), color="#1f77b4", lw=1.2, label="density (SLQ)")
    for rank, value in enumerate(spectrum.top.eigenvalues):
        ax.axvline(value, color="#d62728", ls="--", lw=0.9, label="top eigenvalues" if rank == 0 else None)
        ax.annotate(f"{value:.3g}", (value, 0.97), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    ha="right", va="top", color="#d62728")
    ax.set_ylim(floor, density.density.max() * 3)
    ax.set_xlabel("eigenvalue"); ax.set_ylabel("density (log scale)")
    ax.set_title(f"{label} model: top {spectrum.top.eigenvalues[0]:.4g}, trace {spectrum.trace.trace:.4g} "
                 f"(+-{spectrum.trace.stderr:.2g})", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", frameon=False)


def run(args) -> dict:
    validate(args)
    with load_context(args, "hessian") as ctx:
        batches = draw_batches(ctx, args.hessian_batches)
        samples = sum(len(y) for _, y in batches)
        summary = {"split": ctx.split.name, "samples": samples, "batches": len(batches),
                   "parameters_analysed": args.hessian_params or "all", "tol": args.tol}
        eigen_rows, trace_rows, density_columns, spectra = [], [], {}, {}
        for label, model in ctx.models.items():
            spectrum = compute_hessian_spectrum(
                model, batches, top_k=args.top_k, tol=args.tol, max_iter=args.max_iter,
                trace_probes=args.trace_probes, trace_tol=args.trace_tol, lanczos_steps=args.lanczos_steps,
                density_probes=args.density_probes, sigma_rel=args.sigma, seed=args.seed,
                cache_graph=not args.recompute_graph, param_prefixes=prefixes(args, model))
            spectra[label] = spectrum
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
            unconverged = f" ({missed} not converged in {args.max_iter} iterations)" if missed else ""
            print(f"{label} model on {ctx.split.name} ({samples} samples, {len(batches)} batches, {spectrum.dim} "
                  f"parameters): top eigenvalues {', '.join(f'{v:.6g}' for v in top.eigenvalues)} "
                  f"(descending, tol {args.tol:g}){unconverged}; trace {spectrum.trace.trace:.6g} "
                  f"+- {spectrum.trace.stderr:.2g} ({spectrum.trace.probes} probes)")
        ctx.out.save_csv("hessian_eigenvalues", eigen_rows,
                         header=["model", "rank", "eigenvalue", "power_iterations", "converged"])
        ctx.out.save_csv("hessian_trace", trace_rows, header=["model", "trace", "stderr", "probes", "parameters"])
        ctx.out.save_csv("hessian_density", _columns_to_rows(density_columns), header=list(density_columns))
        fig, axes = side_by_side(len(spectra), width=6, height=4.2)
        for ax, (label, spectrum) in zip(axes, spectra.items()):
            draw_density(ax, spectrum, label)
        fig.suptitle(f"Hessian eigenvalue density, {ctx.record.name}, {ctx.split.name} ({samples} samples)",
                     fontsize=10)
        ctx.out.save_figure(fig, "hessian_density")
        ctx.out.save_json("summary", summary)
        return ctx.finish(summary)


def _columns_to_rows(columns: dict):
    return np.column_stack(list(columns.values())).tolist()


if __name__ == "__main__":
    main(run, add_arguments, description=__doc__, default_split="clean_test")
