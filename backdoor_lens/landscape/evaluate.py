"""Loss and accuracy of a model at w + a*dx + b*dy over a fixed set of batches held in memory.

    loss(a, b)     = (1/N) * sum_i CE(f(x_i; w + a*dx + b*dy), y_i)
    accuracy(a, b) = (1/N) * #{i : argmax f(x_i; w + a*dx + b*dy) = y_i}

over the N samples of a split, loaded once (decoded and normalised, on the device). BatchNorm is in
eval mode: its running statistics (moved too with dir_type "states") define the network, so each
sample's output does not depend on which other samples share its batch.

Two ways to evaluate P grid points:
  loop    (points_per_pass 1): the model's own tensors are overwritten for each point, then one
          ordinary forward pass per batch;
  batched (points_per_pass P > 1): the P weight sets are stacked and one `torch.vmap` over
          `torch.func.functional_call` runs all P on a batch (a convolution becomes one grouped
          convolution). Meant to fill a GPU that one batch leaves idle, it measured slower than
          the loop for a PreAct-ResNet-18 on 32x32 images: 1.72x on an H200 (4 or 16 points per
          pass), 1.53x on 2 CPU cores (4), so the loop is the default everywhere; grouped
          convolutions are not as fast as plain ones. bench/bench_landscape.py measures both.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from backdoor_lens.device import progress


def load_batches(loader, device, desc: str = "load") -> list:
    """[(x, y)] on the device, read once: every grid point reuses them."""
    batches = []
    for x, y, *_ in progress(loader, desc):
        batches.append((x.to(device), torch.as_tensor(y, dtype=torch.long).to(device)))
    return batches


@torch.inference_mode()
def plain_pass(model: torch.nn.Module, batches: list) -> tuple:
    """(mean cross-entropy, accuracy) of one ordinary evaluation pass: the benchmark's unit."""
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
    correct = torch.zeros((), dtype=torch.int64, device=loss.device)
    count = 0
    for x, y in batches:
        logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    return loss.item() / count, correct.item() / count


class GridEvaluator:
    """Evaluates grid points on every split's batches; `__call__(coords)` -> {split: (loss, acc)}.

    model: the centre model (copied; the caller's model is left untouched).
    base, dx, dy: entry name -> tensor, as made by backdoor_lens.landscape.directions (dy None for 1-D).
    data: split name -> [(x, y)] batches already on `device`.
    """

    def __init__(self, model, base: dict, dx: dict, dy: dict | None, data: dict, device,
                 points_per_pass: int = 1):
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        live = dict(self.model.named_parameters())
        live.update(dict(self.model.named_buffers()))
        with torch.no_grad():
            for name, value in base.items():
                live[name].copy_(value)
        # Only entries that move are rewritten per point (biases and BN stay put with biasbn).
        moving = lambda name: bool(dx[name].any()) or (dy is not None and bool(dy[name].any()))  # noqa: E731
        self.names = [name for name in base if moving(name)]
        self.base, self.dx, self.dy = {}, {}, {}
        for name in self.names:
            dtype = live[name].dtype
            self.base[name] = base[name].to(self.device, dtype)
            self.dx[name] = dx[name].to(self.device, dtype)
            self.dy[name] = dy[name].to(self.device, dtype) if dy is not None else None
        self.live = {name: live[name] for name in self.names}
        self.data = data
        self.points_per_pass = max(1, int(points_per_pass))
        self.note = ""
        self.batching_failed = False

    def __call__(self, coords) -> dict:
        """coords: (P, 2) array of (a, b) (b ignored for 1-D). Returns {split: (loss[P], acc[P])}."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        parts, start = [], 0
        while start < len(coords):
            chunk = coords[start:start + self.points_per_pass]
            if len(chunk) > 1:
                try:
                    parts.append(self._batched(chunk))
                    start += len(chunk)
                    continue
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    self.points_per_pass = max(1, len(chunk) // 2)
                    self.note = f"out of GPU memory at {len(chunk)} points per pass; continued with " \
                                f"{self.points_per_pass}"
                    continue
                except (RuntimeError, NotImplementedError) as error:
                    # Some models hold operations vmap cannot batch; the loop gives the same numbers.
                    self.points_per_pass, self.batching_failed = 1, True
                    self.note = f"batched evaluation unavailable for this model " \
                                f"({str(error).splitlines()[0][:120]}); evaluating one point per pass"
                    continue
            parts.append(self._loop(chunk))
            start += len(chunk)
        return {split: (np.concatenate([p[split][0] for p in parts]), np.concatenate([p[split][1] for p in parts]))
                for split in self.data}

    # --- one point per pass ------------------------------------------------------------------
    @torch.inference_mode()
    def _loop(self, coords) -> dict:
        out = {split: (np.empty(len(coords)), np.empty(len(coords))) for split in self.data}
        for k, (a, b) in enumerate(coords):
            for name in self.names:
                torch.add(self.base[name], self.dx[name], alpha=float(a), out=self.live[name])
                if self.dy[name] is not None:
                    self.live[name].add_(self.dy[name], alpha=float(b))
            for split, batches in self.data.items():
                loss, correct, count = self._zeros()
                for x, y in batches:
                    logits = self.model(x)
                    loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
                    correct += (logits.argmax(1) == y).sum()
                    count += len(y)
                out[split][0][k] = loss.item() / count
                out[split][1][k] = correct.item() / count
        return out

    # --- several points per pass -------------------------------------------------------------
    @torch.inference_mode()
    def _batched(self, coords) -> dict:
        P = len(coords)
        a = torch.as_tensor(coords[:, 0], dtype=torch.float32, device=self.device)
        b = torch.as_tensor(coords[:, 1], dtype=torch.float32, device=self.device)
        stacked = {}
        for name in self.names:
            shape = (P,) + (1,) * self.base[name].dim()
            w = self.base[name].unsqueeze(0) + a.view(shape).to(self.base[name].dtype) * self.dx[name].unsqueeze(0)
            if self.dy[name] is not None:
                w = w + b.view(shape).to(w.dtype) * self.dy[name].unsqueeze(0)
            stacked[name] = w
        forward = torch.vmap(lambda weights, x: torch.func.functional_call(self.model, weights, (x,)),
                             in_dims=(0, None))
        out = {}
        for split, batches in self.data.items():
            loss = torch.zeros(P, dtype=torch.float64, device=self.device)
            correct = torch.zeros(P, dtype=torch.int64, device=self.device)
            count = 0
            for x, y in batches:
                logits = forward(stacked, x)  # (P, B, classes)
                per_sample = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat(P), reduction="none")
                loss += per_sample.view(P, -1).double().sum(1)
                correct += (logits.argmax(2) == y.unsqueeze(0)).sum(1)
                count += len(y)
            out[split] = ((loss / count).cpu().numpy(), (correct.double() / count).cpu().numpy())
        return out

    def _zeros(self):
        return (torch.zeros((), dtype=torch.float64, device=self.device),
                torch.zeros((), dtype=torch.int64, device=self.device), 0)
