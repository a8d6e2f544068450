"""Small tensor predicates shared by the techniques."""

from __future__ import annotations

from torch import Tensor


def is_symbolic(t: Tensor) -> bool:
    """True for meta and fake tensors (memory planning): shapes and dtypes without values or storage."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)
