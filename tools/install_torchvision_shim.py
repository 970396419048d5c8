"""Install a start-up hook that lets the CUDA build of torchvision import on a CPU-only torch.

Why: on machines where pip only offers torchvision's CUDA wheel, its compiled operators need a
CUDA torch, and `import torchvision` dies with "operator torchvision::nms does not exist" while
registering fake kernels. The pure-Python parts we use (models, transforms) work once the
schemas of `torchvision::nms` and `torchvision::qnms` exist. The hook defines them, with a
plain-PyTorch nms, the first time anything imports torchvision (grad-cam, torchmetrics and
lpips do so themselves). It is installed only when the plain import fails, so a matched
torch/torchvision pair is left untouched.
"""
import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = '''"""Backdoor Lens: define torchvision's nms schemas before torchvision loads (CPU torch only)."""
import importlib.abc
import sys

_LIB = None


def _define_ops():
    global _LIB
    import torch
    try:
        torch.ops.torchvision.nms
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def nms(dets, scores, iou_threshold):
        order = scores.argsort(descending=True)
        keep = []
        area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
        while order.numel():
            i = order[0]
            keep.append(i)
            rest = order[1:]
            x1 = torch.maximum(dets[i, 0], dets[rest, 0])
            y1 = torch.maximum(dets[i, 1], dets[rest, 1])
            x2 = torch.minimum(dets[i, 2], dets[rest, 2])
            y2 = torch.minimum(dets[i, 3], dets[rest, 3])
            inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
            iou = inter / (area[i] + area[rest] - inter)
            order = rest[iou <= iou_threshold]
        return torch.stack(keep) if keep else torch.empty(0, dtype=torch.long)

    _LIB.impl("nms", nms, "CompositeExplicitAutograd")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_ops()
        return None


sys.meta_path.insert(0, _Finder())
'''


def plain_import_works() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    module, pth = site / "_backdoor_lens_tv_shim.py", site / "backdoor_lens_tv_shim.pth"
    if plain_import_works():
        print("torchvision imports as is; no shim needed")
        return 0
    module.write_text(HOOK_MODULE)
    pth.write_text("import _backdoor_lens_tv_shim\n")
    if not plain_import_works():
        print("torchvision still fails to import after installing the shim", file=sys.stderr)
        return 1
    print(f"installed the torchvision shim in {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
