"""Feature extraction for every layer: one pass with hooks on all layers vs one pass per layer.

BackdoorBench's activation-distribution and TAC scripts run one full pass over the data per
layer and keep every activation map of every sample in memory before reducing. Ours hooks all
layers at once and reduces each output into running per-channel sums as it is produced.
Both compute the same per-channel mean activations here (checked); the headline is the ratio
of the two times measured in this one process, plus the memory each way holds.

    .venv/bin/python bench/bench_features.py [--record record/badnet_demo] [--samples 24]

Uses the demo record when it exists, else a random PreAct-ResNet-18 on random images.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backdoor_lens.stats.activations import ReducingHooks, channel_view  # noqa: E402
from backdoor_lens.models.layers import get_layer, named_layers  # noqa: E402


def one_pass_all_layers(model, loader, layers, device):
    """Ours: every layer's per-channel sums from a single pass (running sums, nothing kept)."""
    sums = {name: 0.0 for name in layers}
    count = 0

    def reduce(name, output):
        sums[name] = sums[name] + channel_view(output).mean(dim=2).sum(dim=0).double()

    with ReducingHooks(model, layers, reduce), torch.inference_mode():
        for batch in loader:
            model(batch[0].to(device))
            count += batch[0].shape[0]
    return {name: (sums[name] / count).cpu().numpy() for name in layers}, 0


def pass_per_layer(model, loader, layers, device):
    """BackdoorBench's way: a full pass per layer, every activation map kept until the end."""
    means, held = {}, 0
    for name in layers:
        kept = []
        handle = get_layer(model, name).register_forward_hook(lambda m, i, o: kept.append(o.detach().cpu().clone()))
        with torch.inference_mode():
            for batch in loader:
                model(batch[0].to(device))
        handle.remove()
        stacked = torch.cat(kept)
        held = max(held, stacked.numel() * stacked.element_size())
        means[name] = channel_view(stacked).mean(dim=2).double().mean(dim=0).numpy()
    return means, held


def demo_loader(record: Path, samples: int, batch_size: int):
    """The demo record's bd_train (stratified sample), through the toolkit's own splits."""
    from backdoor_lens.args import make_args
    from backdoor_lens.context import load_context

    args = make_args(None, default_split="bd_train", result_file_attack=str(record), n_sub=samples,
                     batch_size=batch_size, quiet=True, output_dir=tempfile.mkdtemp(prefix="bench-features-"))
    ctx = load_context(args, "bench_features")
    ctx.out.discard()
    return ctx.model, ctx.loader(ctx.split), ctx.device, f"{record.name}, {len(ctx.split)} samples of bd_train"


def synthetic_loader(samples: int, batch_size: int):
    from backdoor_lens.models import PreActResNet18

    torch.manual_seed(0)
    model = PreActResNet18(10).eval()
    x = torch.randn(samples, 3, 32, 32)
    zeros = torch.zeros(samples, dtype=torch.long)
    data = torch.utils.data.TensorDataset(x, zeros, zeros, zeros, torch.arange(samples))
    return model, torch.utils.data.DataLoader(data, batch_size=batch_size), torch.device("cpu"), \
        f"random PreAct-ResNet-18, {samples} random 32x32 images (demo record not found)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", default=str(ROOT / "record" / "badnet_demo"))
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    record = Path(args.record)
    if (record / "attack_result.pt").is_file():
        model, loader, device, what = demo_loader(record, args.samples, args.batch_size)
    else:
        model, loader, device, what = synthetic_loader(args.samples, args.batch_size)
    layers = named_layers(model)
    with torch.inference_mode():  # warm-up: first-call allocations should not count for either side
        model(next(iter(loader))[0].to(device))
    started = time.perf_counter()
    ours, _ = one_pass_all_layers(model, loader, layers, device)
    t_ours = time.perf_counter() - started
    started = time.perf_counter()
    naive, held = pass_per_layer(model, loader, layers, device)
    t_naive = time.perf_counter() - started
    worst = max(float(np.max(np.abs(ours[n] - naive[n]) / (np.abs(naive[n]).max() + 1e-12))) for n in layers)
    if worst > 1e-4:
        print(f"MISMATCH: per-channel means differ by {worst:.2e} (relative)")
        return 1
    running = sum(len(v) for v in ours.values()) * 8
    print(f"all {len(layers)} layers in one pass vs one pass per layer: {t_naive / t_ours:.1f}x faster "
          f"(same per-channel means, largest relative difference {worst:.1e})")
    print(f"memory for the statistics: {running / 1024:.0f} KiB of running sums vs {held / 2**20:.1f} MiB of stored "
          f"maps for the largest layer alone ({held / running:.0f}x; the stored maps grow with the sample count, "
          f"the sums do not)")
    print(f"  [{what}; {t_ours:.2f} s vs {t_naive:.2f} s on {device}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
