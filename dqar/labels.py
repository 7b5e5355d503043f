"""Class labels: defaults per model and parsing of user input (ids or names)."""
from __future__ import annotations

import numbers
from typing import Sequence

from dqar.errors import DqarError

# The eight ImageNet classes of the seed ablation report: golden retriever, otter, elephant, cliff,
# macaw, balloon, arctic fox, ice cream.
IMAGENET_SHOWCASE = (207, 360, 387, 974, 88, 417, 279, 928)


def default_labels(num_classes: int) -> list[int]:
    """The seed report's eight classes for ImageNet-sized models, else one sample per class."""
    return list(IMAGENET_SHOWCASE) if num_classes >= 1000 else list(range(num_classes))


def cycle_labels(classes: int | Sequence[int], count: int, *, start: int = 0, stride: int = 1) -> list[int]:
    """`count` labels cycling over `classes` (an int n: classes 0..n-1): label i = classes[(start + stride·i) mod len]."""
    pool = range(int(classes)) if isinstance(classes, numbers.Integral) else list(classes)
    if not pool:
        raise DqarError("no classes to cycle over", "pass at least one class id")
    return [int(pool[(start + stride * i) % len(pool)]) for i in range(count)]


def parse_labels(values: Sequence[str], num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """Ids or (case-insensitive) class names → ids in [0, num_classes)."""
    names = {n.lower(): i for i, n in enumerate(class_names or ())}
    out = []
    for v in values:
        key = str(v).strip().lower()
        if key in names:
            out.append(names[key])
            continue
        try:
            i = int(key)
        except ValueError:
            known = f"; names: {', '.join(class_names)}" if class_names else ""
            raise DqarError(f"unknown class '{v}'", f"use an id in [0, {num_classes - 1}]{known}") from None
        if not 0 <= i < num_classes:
            raise DqarError(f"class id {i} is out of range", f"use an id in [0, {num_classes - 1}]")
        out.append(i)
    if not out:
        raise DqarError("no classes given", "pass at least one class id")
    return out
