"""How techniques find the parts of a model they act on.

A model (or any module inside a LightningModule) takes part by defining ``memkit_blocks()``, which
returns its transformer blocks in order. The reference :class:`~lightning_memkit.models.Transformer`
and :class:`~lightning_memkit.models.HFCausalLM` do. For other models :func:`find_blocks` falls back
to the structure: the outermost ``nn.ModuleList`` / ``nn.Sequential`` containers whose children are
two or more non-leaf modules of one class (``model.layers`` in Hugging Face models, ``transformer.h``
in GPT-2, ``blocks`` in nanoGPT and timm).
"""

from __future__ import annotations

from torch import nn


def _declared_blocks(root: nn.Module) -> list[nn.Module] | None:
    for module in root.modules():
        fn = getattr(module, "memkit_blocks", None)
        if callable(fn):
            return list(fn())
    return None


def _is_block_list(container: nn.Module) -> bool:
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return False
    children = list(container.children())
    if len(children) < 2:
        return False
    cls = type(children[0])
    return all(type(c) is cls for c in children) and all(any(True for _ in c.children()) for c in children)


def find_blocks(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks under ``root``, in order; ``[]`` if none are recognizable."""
    declared = _declared_blocks(root)
    if declared is not None:
        return declared
    found: list[nn.Module] = []
    taken: set[int] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in taken:
                continue
            if _is_block_list(child):
                for block in child.children():
                    taken.add(id(block))
                    found.append(block)
            else:
                visit(child)

    visit(root)
    return found
