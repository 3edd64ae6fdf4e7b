"""World classes, semantic classes and their palette: loaded from assets/*.json (one source of truth)."""
from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
WORLD_CLASSES_JSON = ASSETS_DIR / "world_classes.json"
SEG_PALETTE_JSON = ASSETS_DIR / "seg_palette.json"


def _load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["classes"]
    ids = [e["id"] for e in entries]
    if ids != list(range(len(entries))):
        raise ValueError(f"{path}: class ids must be 0..N-1 in order, got {ids}")
    return entries


_WORLD = _load(WORLD_CLASSES_JSON)
_SEG = _load(SEG_PALETTE_JSON)

CLASS_NAMES: list[str] = [e["name"] for e in _WORLD]
SEG_CLASSES: list[str] = [e["name"] for e in _SEG]
SEG_PALETTE: list[tuple[int, int, int]] = [tuple(int(v) for v in e["rgb"]) for e in _SEG]
SEG = {name: i for i, name in enumerate(SEG_CLASSES)}  # name -> label id

# The renderer assigns these labels by name; the JSON must define all of them.
_REQUIRED_SEG = ("sky", "cloud", "water", "sand", "grass", "forest", "rock", "snow")
_missing = [n for n in _REQUIRED_SEG if n not in SEG]
if _missing:
    raise ValueError(f"{SEG_PALETTE_JSON}: missing semantic classes {_missing}")
if len(set(SEG_PALETTE)) != len(SEG_PALETTE):
    raise ValueError(f"{SEG_PALETTE_JSON}: palette colours must be distinct")


def class_id_of(name_or_id: int | str) -> int:
    """A world class id from its name or id; ValueError when unknown."""
    if isinstance(name_or_id, str):
        if name_or_id not in CLASS_NAMES:
            raise ValueError(f"unknown world class {name_or_id!r}; known: {CLASS_NAMES}")
        return CLASS_NAMES.index(name_or_id)
    i = int(name_or_id)
    if not 0 <= i < len(CLASS_NAMES):
        raise ValueError(f"world class id {i} out of range 0..{len(CLASS_NAMES) - 1}")
    return i
