"""ImageNet's 1000 classes: WordNet synset ids (what TFDS's imagenet2012 labels are) and
the human-readable names (torchvision's list), both in the same (sorted synset) order.
Both lists ship with the package (vgg_jax/data), so nothing is downloaded."""
from __future__ import annotations

import functools
import os

_DATA = os.path.join(os.path.dirname(__file__), "data")


@functools.lru_cache(maxsize=None)
def _read(name: str) -> tuple[str, ...]:
    with open(os.path.join(_DATA, name)) as f:
        return tuple(line.strip() for line in f if line.strip())


def imagenet_names() -> list[str]:
    """'tench', 'goldfish', ... (index = label)."""
    return list(_read("imagenet_classes.txt"))


def imagenet_synsets() -> list[str]:
    """'n01440764', 'n01443537', ... (index = label, as TFDS imagenet2012)."""
    return list(_read("imagenet_synsets.txt"))


def descriptions(class_names) -> list[str] | None:
    """Human-readable names for class names that are ImageNet synset ids (a full or
    partial set, any order); None when they are not."""
    lookup = dict(zip(_read("imagenet_synsets.txt"), _read("imagenet_classes.txt")))
    names = [str(c) for c in class_names]
    if not names or not all(c in lookup for c in names):
        return None
    return [lookup[c] for c in names]


def display_names(meta: dict, num_classes: int) -> list[str]:
    """What to print for each class of a weights directory: 'tench (n01440764)' when the
    weights carry descriptions, else the class names (or indices)."""
    names = meta.get("class_names") or [str(i) for i in range(num_classes)]
    desc = meta.get("class_descriptions")
    if desc and len(desc) == len(names):
        return [f"{d} ({n})" for d, n in zip(desc, names)]
    return list(names)
