"""A data-free defense for the demo: Channel Lipschitzness-based Pruning (CLP, Zheng et al. 2022).

    python -m demo.defense_clp record/badnet_demo [--u 3]

The demo writes what BackdoorBench's CLP defense (defense/clp.py) would write, so it prunes by
BackdoorBench's rule (backdoor_lens/stats/lipschitz.py, pairing "backdoorbench"): each BatchNorm2d is paired with
the last Conv2d registered before it, std = sqrt(running_var) without eps, and the BN channels
above mean + u*std of their layer get weight and bias zeroed. `visual_lips.py --pairing
backdoorbench` flags exactly these channels. The result is written as BackdoorBench writes a
defense: record/<name>/defense/clp/defense_result.pt, a plain state_dict with zeroed channels.
"""
import argparse
import sys
from pathlib import Path

import torch

from backdoor_lens.context import load_zoo_model
from backdoor_lens.stats.lipschitz import compute_channel_lipschitz
from backdoor_lens.stats.metrics import accuracy, predict
from backdoor_lens.record.datasets import dataset_info, open_clean_dataset
from backdoor_lens.record.record import load_record
from backdoor_lens.record.splits import ImageTransform, build_split


@torch.no_grad()
def prune_clp(model: torch.nn.Module, u: float) -> int:
    """Zero, in place, the BN channels BackdoorBench's CLP zeroes; returns how many."""
    modules = dict(model.named_modules())
    zeroed = 0
    for unit in compute_channel_lipschitz(model, u=u, pairing="backdoorbench"):
        channels = torch.as_tensor(unit.flagged, dtype=torch.long)
        modules[unit.bn].weight[channels] = 0
        modules[unit.bn].bias[channels] = 0
        zeroed += len(channels)
    return zeroed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record")
    parser.add_argument("--u", type=float, default=3.0)
    args = parser.parse_args(argv)
    record = load_record(args.record)
    model = load_zoo_model(record.model_name, record.num_classes, record.state_dict, record.img_size[2],
                        str(record.path), torch.device("cpu"))
    zeroed = prune_clp(model, args.u)
    folder = Path(record.path) / "defense" / "clp"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_name": record.model_name, "num_classes": record.num_classes, "model": model.state_dict()},
               folder / "defense_result.pt")
    info = dataset_info(record.dataset)
    transform = ImageTransform(record.img_size[:2], record.img_size[2], info.mean, info.std)
    test = open_clean_dataset(record.dataset, record.dataset_root(None), False)
    scores = {}
    for name in ("clean_test", "bd_test"):
        split = build_split(name, record, None, test, transform)
        preds = predict(model, torch.utils.data.DataLoader(split, batch_size=256), torch.device("cpu"), desc=name)
        scores[name] = accuracy(preds.pred, preds.labels)
    print(f"CLP (u={args.u}): zeroed {zeroed} channels; clean accuracy {scores['clean_test']:.3f}, "
          f"ASR {scores['bd_test']:.3f} -> {folder / 'defense_result.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
