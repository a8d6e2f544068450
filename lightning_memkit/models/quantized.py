"""Quantized base weights (QLoRA: bitsandbytes 4-bit ``Linear4bit``) kept trainable through validation.

bitsandbytes (0.49, 0.50) on CPUs with AVX512-BF16 repacks a ``Linear4bit``'s weight for a bf16 inference kernel
the first time the layer runs in eval mode without gradients, and never unpacks it: from then on its forward uses
that kernel (``gemv_4bit``), which has no backward, so nothing upstream of the layer gets a gradient. In a
Lightning fit the sanity check and every validation run in eval mode, after which the LoRA factors silently stop
training. :func:`keep_4bit_trainable` turns the repacking off (and undoes it where it already happened); GPU
layers are unaffected (the repacking is CPU-only).
"""

from __future__ import annotations

import sys

from torch import nn


def keep_4bit_trainable(module: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every ``Linear4bit`` in ``module``; returns how many.

    Without bitsandbytes imported there is no such layer, and nothing is imported here.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    changed = 0
    for m in module.modules():
        if not isinstance(m, bnb.nn.Linear4bit) or not getattr(m, "support_avx512bf16_for_cpu", False):
            continue
        m.support_avx512bf16_for_cpu = False
        state = getattr(m.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
        changed += 1
    return changed
