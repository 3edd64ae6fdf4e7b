"""The procedural landscape world: image + exact depth + semantic labels + class, per seed.

    from studio.world import render, render_batch, CLASS_NAMES, SEG_CLASSES, SEG_PALETTE
    s = render(seed, size=128)   # s.image (PIL), s.depth (HxW float32), s.labels (HxW uint8), s.class_id

Classes and palette live in assets/world_classes.json and assets/seg_palette.json.
"""
from .classes import CLASS_NAMES, SEG_CLASSES, SEG_PALETTE, class_id_of
from .render import (
    FAR_DEPTH,
    WORLD_VERSION,
    WorldBatch,
    WorldSample,
    render,
    render_batch,
)

__all__ = [
    "CLASS_NAMES",
    "SEG_CLASSES",
    "SEG_PALETTE",
    "FAR_DEPTH",
    "WORLD_VERSION",
    "WorldBatch",
    "WorldSample",
    "class_id_of",
    "colorize_labels",
    "render",
    "render_batch",
]


def colorize_labels(labels):
    """(H, W) label ids -> (H, W, 3) uint8 RGB with SEG_PALETTE."""
    import numpy as np

    return np.asarray(SEG_PALETTE, np.uint8)[np.asarray(labels)]
