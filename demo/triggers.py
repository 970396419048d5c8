"""The demo's triggers, applied to uint8 H x W x C images (or N x H x W x C batches)."""
import numpy as np


def badnets_patch(images: np.ndarray, size: int = 3) -> np.ndarray:
    """BadNets: a white size x size square in the bottom-right corner (as BackdoorBench's CIFAR grid)."""
    out = images.copy()
    out[..., -size - 1:-1, -size - 1:-1, :] = 255
    return out


def blend_pattern(shape, seed: int = 7) -> np.ndarray:
    """A fixed pattern to blend in: seeded uniform noise (BackdoorBench blends a cartoon image)."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def blended(images: np.ndarray, alpha: float = 0.2, seed: int = 7) -> np.ndarray:
    pattern = blend_pattern(images.shape[-3:], seed).astype(np.float32)
    mixed = (1 - alpha) * images.astype(np.float32) + alpha * pattern
    return mixed.round().clip(0, 255).astype(np.uint8)


TRIGGERS = {"badnet": badnets_patch, "blended": blended}
