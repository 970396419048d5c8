"""The Hessian of a model's loss, seen only through Hessian-vector products.

H = d^2 L / d theta^2, with L the mean cross-entropy over a fixed set of batches and theta all
trainable parameters. H is never formed: `HessianOperator.matvec(v)` returns H v by double
backpropagation, H v = d/d theta (grad L . v), one extra backward pass per batch.

On top of it:
- `top_eigenvalues`: power iteration with deflation. The i-th eigenvector is iterated on
  (I - sum_j q_j q_j^T) H, so that the directions already found are projected out; stops when the
  Rayleigh quotient changes by less than `tol` relative to its size. Power iteration finds the
  eigenvalues of largest *magnitude*; at a minimum those are the largest ones, but a strongly
  negative eigenvalue can appear among them (they are reported sorted, descending).
- `hutchinson_trace`: tr(H) = E[v^T H v] for Rademacher v (entries +-1); the estimate is the mean
  over probes, and its standard error is reported.
- `slq_density`: stochastic Lanczos quadrature. For a probe v (Gaussian, normalised), m steps of
  Lanczos (with full reorthogonalisation) give a tridiagonal T = U diag(theta) U^T; the nodes
  theta_j with weights tau_j = U[0, j]^2 are a quadrature rule for the spectral measure of H seen
  from v, whose mean over probes estimates the eigenvalue density
  phi(t) = 1/n sum_i delta(t - lambda_i). Each node is broadened by a Gaussian of variance sigma^2.

PyHessian (PyPI 0.1) does the same but is broken on current PyTorch: its density calls the
removed `torch.eig`, and it defaults to CUDA. Hence this small module.

The model is put in eval mode: BatchNorm uses its running statistics, so this is the Hessian of
the function the model computes at test time (as PyHessian does).
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_lens.device import progress


class HessianOperator:
    """v -> H v for the mean cross-entropy over `batches` (a list of (x, y) on the model's device).

    cache_graph=True keeps each batch's first-order gradient graph, so that a product costs only
    the second backward pass (memory grows with the number and size of the batches);
    cache_graph=False recomputes the forward and first backward pass for every product.
    """

    def __init__(self, model: torch.nn.Module, batches, loss_fn=None, cache_graph: bool = True, params=None):
        self.model = model.eval()
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.batches = [(x, y) for x, y in batches]
        if not self.batches:
            raise ValueError("no batches to compute the Hessian on")
        self.loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits, y))
        self.total = sum(len(y) for _, y in self.batches)
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.cache_graph = cache_graph
        self._grads = None
        self.products = 0

    def _batch_grads(self, x, y):
        """Gradient of this batch's share of the mean loss, with its graph kept for a second pass."""
        weight = len(y) / self.total
        with torch.enable_grad():
            loss = self.loss_fn(self.model(x), y) * weight
            return torch.autograd.grad(loss, self.params, create_graph=True)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss (for reference and for tests)."""
        total = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        for x, y in self.batches:
            total += torch.cat([g.detach().reshape(-1) for g in self._batch_grads(x, y)])
        return total

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length `dim`."""
        self.products += 1
        pieces = self._split(v)
        out = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        if self.cache_graph and self._grads is None:
            self._grads = [self._batch_grads(x, y) for x, y in self.batches]
        for k, (x, y) in enumerate(self.batches):
            grads = self._grads[k] if self.cache_graph else self._batch_grads(x, y)
            with torch.enable_grad():
                hv = torch.autograd.grad(grads, self.params, grad_outputs=pieces, retain_graph=self.cache_graph,
                                         allow_unused=True)
            out += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                              for h, p in zip(hv, self.params)])
        return out

    def _split(self, v: torch.Tensor):
        pieces, start = [], 0
        for p in self.params:
            pieces.append(v[start:start + p.numel()].view_as(p))
            start += p.numel()
        return pieces

    def random(self, generator: torch.Generator, kind: str = "gaussian") -> torch.Tensor:
        v = torch.randn(self.dim, generator=generator, dtype=self.dtype)
        if kind == "rademacher":
            v = torch.sign(v)
            v[v == 0] = 1
        return v.to(self.device)

    def release(self):
        self._grads = None


@dataclass
class TopEigen:
    eigenvalues: np.ndarray  # sorted descending; the lists below follow the same order
    iterations: list  # power iterations each eigenvalue took
    converged: list  # whether each met the tolerance
    tol: float
    vectors: list = field(default_factory=list, repr=False)  # unit eigenvectors


def top_eigenvalues(op: HessianOperator, k: int = 3, tol: float = 1e-3, max_iter: int = 100,
                    generator: torch.Generator | None = None, desc: str = "top eigenvalues") -> TopEigen:
    """The k eigenvalues of largest magnitude, by power iteration with deflation (see module doc)."""
    generator = generator or torch.Generator().manual_seed(0)
    found, values, iterations, converged = [], [], [], []

    def project(w):
        for q in found:
            w = w - torch.dot(w, q) * q
        return w

    for _ in progress(range(min(k, op.dim)), desc):
        v = project(op.random(generator))
        v = v / v.norm()
        eigenvalue, done, steps = 0.0, False, 0
        for steps in range(1, max_iter + 1):
            hv = project(op.matvec(v))
            eigenvalue = torch.dot(hv, v).item()
            residual = (hv - eigenvalue * v).norm().item()
            norm = hv.norm()
            if residual <= tol * abs(eigenvalue) or norm.item() == 0:  # 0: v lies in the deflated null space
                done = True
                break
            v = hv / norm
        found.append(v)
        values.append(eigenvalue)
        iterations.append(steps)
        converged.append(done)
    order = np.argsort(values, kind="stable")[::-1]
    return TopEigen(np.asarray(values, dtype=np.float64)[order], [iterations[i] for i in order],
                    [converged[i] for i in order], tol, [found[i] for i in order])


@dataclass
class TraceEstimate:
    trace: float
    stderr: float  # standard error of the mean over probes
    probes: int
    samples: np.ndarray  # v^T H v per probe


def hutchinson_trace(op: HessianOperator, probes: int = 20, tol: float | None = None, min_probes: int = 5,
                     generator: torch.Generator | None = None, desc: str = "trace") -> TraceEstimate:
    """tr(H) ~ mean of v^T H v over Rademacher probes v.

    With `tol`, stops early once the standard error falls below tol * |estimate| (after min_probes).
    """
    generator = generator or torch.Generator().manual_seed(1)
    samples = []
    for _ in progress(range(probes), desc):
        v = op.random(generator, "rademacher")
        samples.append(torch.dot(op.matvec(v), v).item())
        if tol is not None and len(samples) >= max(2, min_probes):
            mean, se = _mean_se(samples)
            if se <= tol * abs(mean):
                break
    mean, se = _mean_se(samples)
    return TraceEstimate(mean, se, len(samples), np.asarray(samples))


def _mean_se(samples):
    values = np.asarray(samples, dtype=np.float64)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def lanczos(op: HessianOperator, v: torch.Tensor, steps: int):
    """Lanczos tridiagonalisation from v with full reorthogonalisation; returns (alpha, beta).

    T has diagonal alpha (length m) and off-diagonal beta (length m - 1); m < steps when the
    Krylov space is exhausted (beta below round-off).
    """
    steps = min(steps, op.dim)
    basis = torch.empty(steps, op.dim, device=v.device, dtype=v.dtype)
    basis[0] = v / v.norm()
    alphas, betas = [], []
    for i in range(steps):
        w = op.matvec(basis[i])
        alpha = torch.dot(w, basis[i])
        alphas.append(alpha.item())
        # Twice (classical Gram-Schmidt, reapplied) keeps the basis orthogonal in floating point.
        for _ in range(2):
            w = w - basis[:i + 1].T @ (basis[:i + 1] @ w)
        beta = w.norm().item()
        if i == steps - 1 or beta < 1e-10 * max(1.0, abs(alphas[0])):
            break
        betas.append(beta)
        basis[i + 1] = w / beta
    return np.asarray(alphas), np.asarray(betas[:len(alphas) - 1])


@dataclass
class Density:
    grid: np.ndarray
    density: np.ndarray  # integrates to 1 over the grid (trapezoid)
    nodes: list  # per probe: Ritz values theta_j
    weights: list  # per probe: tau_j = U[0, j]^2 (sum to 1)
    sigma: float


def slq_density(op: HessianOperator, steps: int = 30, probes: int = 2, bins: int = 2000, sigma_rel: float = 1e-3,
                generator: torch.Generator | None = None, desc: str = "density") -> Density:
    """Eigenvalue density by stochastic Lanczos quadrature (see module doc).

    The Gaussian broadening has standard deviation sigma = sigma_rel * (largest - smallest node),
    the grid spans the nodes with a margin of 5 sigma on each side.
    """
    generator = generator or torch.Generator().manual_seed(2)
    nodes, weights = [], []
    for _ in progress(range(probes), desc):
        alpha, beta = lanczos(op, op.random(generator), steps)
        tri = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, vectors = np.linalg.eigh(tri)
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
    every = np.concatenate(nodes)
    spread = float(every.max() - every.min())
    sigma = sigma_rel * spread if spread > 0 else max(abs(float(every.max())), 1.0) * 1e-3
    grid = np.linspace(every.min() - 5 * sigma, every.max() + 5 * sigma, bins)
    density = np.zeros(bins)
    for theta, tau in zip(nodes, weights):
        density += (tau[None, :] * np.exp(-(grid[:, None] - theta[None, :]) ** 2 / (2 * sigma ** 2))).sum(1)
    density /= len(nodes) * np.sqrt(2 * np.pi) * sigma
    return Density(grid, density, nodes, weights, sigma)


@dataclass
class HessianSpectrum:
    top: TopEigen
    trace: TraceEstimate
    density: Density
    dim: int
    samples: int
    products: int  # Hessian-vector products used


def select_parameters(model: torch.nn.Module, prefixes=None) -> list:
    """(name, parameter) pairs inside the modules (or equal to the parameters) named by `prefixes`;
    all of them when None or empty. 'layer4' takes layer4.*, not layer40.*."""
    named = [(n, p) for n, p in model.named_parameters()]
    if not prefixes:
        return named
    return [(n, p) for n, p in named if any(n == pre or n.startswith(pre + ".") for pre in prefixes)]


def compute_hessian_spectrum(model, batches, top_k: int = 3, tol: float = 1e-3, max_iter: int = 100,
                             trace_probes: int = 20, trace_tol: float | None = None, lanczos_steps: int = 30,
                             density_probes: int = 2, sigma_rel: float = 1e-3, seed: int = 0,
                             cache_graph: bool = True, param_prefixes=None) -> HessianSpectrum:
    """Top-k eigenvalues, trace and eigenvalue density of the mean cross-entropy over `batches`,
    with respect to the parameters named by `param_prefixes` (all when None)."""
    chosen = select_parameters(model, param_prefixes)
    if not chosen:
        raise ValueError(f"no parameter name starts with any of {list(param_prefixes)}")
    keep = {id(p) for _, p in chosen}
    # The other parameters are constants here: no graph is built for them, which saves memory.
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    op = HessianOperator(model, batches, cache_graph=cache_graph, params=[p for _, p in chosen])
    generator = torch.Generator().manual_seed(seed)
    try:
        top = top_eigenvalues(op, top_k, tol, max_iter, generator)
        top.vectors = []  # the caller wants numbers; eigenvectors are as large as the model
        trace = hutchinson_trace(op, trace_probes, trace_tol, generator=generator)
        density = slq_density(op, lanczos_steps, density_probes, sigma_rel=sigma_rel, generator=generator)
    finally:
        op.release()
        for p in frozen:
            p.requires_grad_(True)
    return HessianSpectrum(top, trace, density, op.dim, op.total, op.products)
