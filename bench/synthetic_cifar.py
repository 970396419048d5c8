"""A synthetic CIFAR-10-sized BackdoorBench record for the benchmarks (built once, then cached).

    .venv/bin/python bench/synthetic_cifar.py [--train_images N] [--epochs E] [--out record/bench_cifar10] [--force]

The data: 50,000 training and 10,000 test images of 32x32x3, colour-coded (each class a base
colour, every image with its own brightness, a striped texture and noise), written in CIFAR-10's
on-disk layout (`cifar-10-batches-py/data_batch_1..5`, `test_batch`, `batches.meta`: pickles of
'data', N x 3072 uint8 rows in C, H, W order, and 'labels' / 'label_names') beside the record,
in `<out>_data/`. The record: a PreAct-ResNet-18 trained with a BadNets 3x3 patch stamped after
augmentation (the demo's trigger, shift and record writer), 10% of the training samples (5,000)
poisoned to target 0, chosen among the non-target ones; bd_test holds the 9,000 non-target test
images with the patch.

Training: on a GPU 6 epochs over all 50,000 images; on a CPU, where that would take hours,
--train_images 2,000 for 2 epochs by default. The benchmarks measure ratios of times over the
same model, which do not depend on how well it learned; the clean accuracy and ASR are printed
and kept in <out>/bench_build.json (measured on --eval_images test images: all on a GPU, the
first 500 on a CPU).

Cached: rebuilt only with --force or when VERSION changes (other flags do not invalidate it).
"""
import argparse
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo.bb_record import write_attack_record  # noqa: E402
from demo.build_demo import _shift  # noqa: E402
from demo.triggers import badnets_patch  # noqa: E402
from backdoor_lens.device import pick_device, progress, seed_everything  # noqa: E402
from backdoor_lens.models import PreActResNet18  # noqa: E402
from backdoor_lens.record.datasets import dataset_info  # noqa: E402
from backdoor_lens.record.splits import ImageTransform  # noqa: E402

VERSION = 1  # bump to invalidate cached synthetic records and data
DEFAULT_OUT = ROOT / "record" / "bench_cifar10"
TARGET = 0
PRATIO = 0.1
N_TRAIN, N_TEST = 50_000, 10_000
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# One base colour per class, none near white, so that the white patch stays distinct.
PALETTE = np.array([(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200),
                    (40, 200, 200), (120, 70, 20), (250, 140, 0), (110, 110, 110), (20, 20, 70)], dtype=np.float32)
BUILD_FILE = "bench_build.json"
DATA_STAMP = "synthetic.json"


def defaults(device: torch.device) -> dict:
    """The training budget for the device: all images for 6 epochs on a GPU, a subset on a CPU."""
    if device.type == "cuda":
        return {"train_images": N_TRAIN, "epochs": 6, "eval_images": None}
    return {"train_images": 2000, "epochs": 2, "eval_images": 500}


def data_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}_data"


# --- the data ---------------------------------------------------------------------------------

def make_images(labels: np.ndarray, rng: np.random.Generator, chunk: int = 5000) -> np.ndarray:
    """N x 32 x 32 x 3 uint8: the class's base colour, shifted in brightness per image, plus a
    striped texture (random orientation, frequency and phase) and Gaussian noise."""
    out = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    yy, xx = np.meshgrid(np.arange(32, dtype=np.float32), np.arange(32, dtype=np.float32), indexing="ij")
    for start in range(0, len(labels), chunk):
        part = labels[start:start + chunk]
        n = len(part)
        angle = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
        frequency = rng.uniform(0.2, 0.8, n).astype(np.float32)[:, None, None]
        phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
        stripes = 25 * np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        brightness = rng.uniform(-30, 30, n).astype(np.float32)[:, None, None, None]
        image = PALETTE[part][:, None, None, :] + brightness + stripes[..., None]
        image += rng.normal(0, 12, image.shape).astype(np.float32)
        out[start:start + n] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % len(LABEL_NAMES)).astype(np.int64)


def _dump(path: Path, content: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=4)


def write_cifar10(folder: Path, train: tuple, test: tuple) -> Path:
    """CIFAR-10's layout under folder/cifar-10-batches-py: five training batches, the test batch and
    batches.meta. train, test: (N x 32 x 32 x 3 uint8 images, N labels)."""
    base = Path(folder) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def rows(images):  # the official row layout: C, H, W flattened per image
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))

    train_images, train_labels = train
    for k, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        _dump(base / f"data_batch_{k}", {"batch_label": f"training batch {k} of 5",
                                         "labels": [int(v) for v in train_labels[part]],
                                         "data": rows(train_images[part])})
    test_images, test_labels = test
    _dump(base / "test_batch", {"batch_label": "testing batch 1 of 1",
                                "labels": [int(v) for v in test_labels], "data": rows(test_images)})
    _dump(base / "batches.meta", {"label_names": list(LABEL_NAMES), "num_cases_per_batch": len(train_labels) // 5,
                                  "num_vis": 3072})
    return base


def synthetic_data(n_train: int, n_test: int, seed: int = 0) -> tuple:
    """((train images, labels), (test images, labels)), the same for the same arguments."""
    rng = np.random.default_rng(seed)
    train_labels, test_labels = balanced_labels(n_train, rng), balanced_labels(n_test, rng)
    return (make_images(train_labels, rng), train_labels), (make_images(test_labels, rng), test_labels)


# --- the backdoored model ---------------------------------------------------------------------

def _transform() -> ImageTransform:
    info = dataset_info("cifar10")
    return ImageTransform(size=(32, 32), channels=3, mean=info.mean, std=info.std)


@torch.inference_mode()
def accuracy(model, images: np.ndarray, labels: np.ndarray, device, batch_size: int = 256) -> float:
    model.eval()
    transform, correct = _transform(), 0
    for start in range(0, len(images), batch_size):
        x = transform.batch(torch.from_numpy(images[start:start + batch_size]).to(device))
        correct += int((model(x).argmax(1).cpu().numpy() == labels[start:start + batch_size]).sum())
    return correct / max(1, len(images))


def train_backdoor(images: np.ndarray, labels: np.ndarray, poisoned: np.ndarray, chosen: np.ndarray, epochs: int,
                   device, rng: np.random.Generator, batch_size: int = 128):
    """PreAct-ResNet-18 on images[chosen]: each batch shifted by up to 2 pixels (the demo's
    augmentation), then the patch stamped on its poisoned samples, which are served the target."""
    model = PreActResNet18(num_classes=10).to(device)
    transform = _transform()
    served = np.where(poisoned, TARGET, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * int(np.ceil(len(chosen) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=max(1, steps))
    cuda = device.type == "cuda"
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(chosen)
        for start in progress(range(0, len(order), batch_size), desc=f"epoch {epoch + 1}/{epochs}"):
            batch = order[start:start + batch_size]
            pixels = _shift(images[batch], rng)
            stamp = poisoned[batch]
            if stamp.any():
                pixels[stamp] = badnets_patch(pixels[stamp])
            x = transform.batch(torch.from_numpy(pixels).to(device, non_blocking=cuda))
            y = torch.from_numpy(served[batch]).to(device, non_blocking=cuda)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


# --- the record -------------------------------------------------------------------------------

def cached(out: Path) -> dict | None:
    """The build json of a record built by this VERSION, else None."""
    stamp, data_stamp = Path(out) / BUILD_FILE, data_dir_for(Path(out)) / DATA_STAMP
    if not (stamp.is_file() and data_stamp.is_file() and (Path(out) / "attack_result.pt").is_file()):
        return None
    built = json.loads(stamp.read_text())
    data = json.loads(data_stamp.read_text())
    return built if built.get("version") == VERSION and data.get("version") == VERSION else None


def ensure_data(data_dir: Path, n_train: int, n_test: int, force: bool = False) -> tuple:
    """The synthetic dataset, written to data_dir unless a copy of this VERSION and size is there."""
    stamp = data_dir / DATA_STAMP
    wanted = {"version": VERSION, "n_train": n_train, "n_test": n_test}
    train, test = synthetic_data(n_train, n_test)
    if force or not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        if data_dir.exists():
            shutil.rmtree(data_dir)
        write_cifar10(data_dir, train, test)
        stamp.write_text(json.dumps(wanted))
    return train, test


def build(out: Path = DEFAULT_OUT, train_images: int | None = None, epochs: int | None = None,
          eval_images: int | None = None, force: bool = False, device: str = "auto", n_train: int = N_TRAIN,
          n_test: int = N_TEST, seed: int = 0, quiet: bool = False) -> dict:
    """Build (or find cached) the synthetic record at `out`; returns its build json."""
    out = Path(out).resolve()
    if not force and (built := cached(out)) is not None:
        if not quiet:
            print(f"{out.name}: cached in {out} ({built['train_images']} training images, {built['epochs']} epochs, "
                  f"clean accuracy {built['clean_accuracy']:.3f}, ASR {built['asr']:.3f}); --force rebuilds")
        return built
    started = time.time()
    dev = pick_device(device)
    budget = defaults(dev)
    train_images = min(n_train, train_images or budget["train_images"])
    epochs = epochs or budget["epochs"]
    eval_images = min(n_test, eval_images or budget["eval_images"] or n_test)
    seed_everything(seed)
    data_dir = data_dir_for(out)
    (train_x, train_y), (test_x, test_y) = ensure_data(data_dir, n_train, n_test, force)

    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(train_y != TARGET)
    poison_idx = np.sort(rng.choice(candidates, size=int(round(PRATIO * n_train)), replace=False))
    poisoned = np.zeros(n_train, bool)
    poisoned[poison_idx] = True
    chosen = np.sort(rng.choice(n_train, size=train_images, replace=False))
    if not quiet:
        print(f"{out.name}: training PreAct-ResNet-18 with a BadNets patch on {train_images} of {n_train} synthetic "
              f"CIFAR-10 images ({int(poisoned[chosen].sum())} poisoned), {epochs} epochs on {dev}", flush=True)
    model = train_backdoor(train_x, train_y, poisoned, chosen, epochs, dev, rng)
    trained = time.time() - started

    test_bd_idx = np.flatnonzero(test_y != TARGET)
    clean_acc = accuracy(model, test_x[:eval_images], test_y[:eval_images], dev)
    measured_bd = test_bd_idx[test_bd_idx < eval_images]
    asr = accuracy(model, badnets_patch(test_x[measured_bd]), np.full(len(measured_bd), TARGET), dev)

    if out.exists():
        shutil.rmtree(out)
    stamped_train = badnets_patch(train_x[poison_idx])
    stamped_test = badnets_patch(test_x[test_bd_idx])
    train_poison = {int(i): (img, TARGET, int(train_y[i])) for i, img in zip(poison_idx, stamped_train)}
    test_poison = {int(i): (img, TARGET, int(test_y[i])) for i, img in zip(test_bd_idx, stamped_test)}
    # BackdoorBench stores data_path relative to the folder that holds record/ (the record's grandparent).
    data_path = "./" + data_dir.relative_to(out.parent.parent).as_posix()
    write_attack_record(out, model_name="preactresnet18", num_classes=10,
                        state_dict=model.state_dict(), dataset="cifar10",
                        img_size=(32, 32, 3), train_poison=train_poison, n_train=n_train, test_poison=test_poison,
                        n_test=n_test, data_path=data_path)
    built = {"version": VERSION, "target": TARGET, "pratio": PRATIO, "n_train": n_train, "n_test": n_test,
             "train_images": int(train_images), "epochs": int(epochs), "device": str(dev),
             "eval_images": int(eval_images), "clean_accuracy": clean_acc, "asr": asr,
             "train_seconds": round(trained, 1), "seconds": round(time.time() - started, 1),
             "data": str(data_dir)}
    (out / BUILD_FILE).write_text(json.dumps(built, indent=2))
    if not quiet:
        print(f"{out.name}: clean accuracy {clean_acc:.3f}, ASR {asr:.3f} (on {eval_images} test images; "
              f"trained in {trained:.1f} s, {built['seconds']} s in all) -> {out}")
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the record folder (the data goes to <out>_data)")
    parser.add_argument("--train_images", type=int, help="training images used (GPU: 50,000; CPU: 2,000)")
    parser.add_argument("--epochs", type=int, help="epochs (GPU: 6; CPU: 2)")
    parser.add_argument("--eval_images", type=int, help="test images for clean accuracy and ASR (GPU: all; CPU: 500)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n_train", type=int, default=N_TRAIN, help="size of the synthetic training set")
    parser.add_argument("--n_test", type=int, default=N_TEST, help="size of the synthetic test set")
    parser.add_argument("--force", action="store_true", help="rebuild the data and the record")
    args = parser.parse_args(argv)
    for flag in ("train_images", "epochs", "eval_images", "n_train", "n_test"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be at least 1")
    build(Path(args.out), args.train_images, args.epochs, args.eval_images, args.force, args.device,
          args.n_train, args.n_test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
