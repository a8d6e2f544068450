"""Rebuild the optimizer a LightningModule returned as a memkit optimizer, keeping its groups.

:func:`read_optimizer` reads ``torch.optim.AdamW`` / ``torch.optim.Adam`` (without L2 weight decay,
AMSGrad or maximize, which have no memkit equivalent) and refuses anything else with the reason.
:func:`select_lowrank` picks the weights for the low-rank rule by module-name patterns: trainable ones only
(frozen weights take no step), and not PEFT's LoRA factors unless a pattern names them (they are low-rank
already, so AdamW updates them).
:func:`convert_optimizer` builds the new optimizer over the *same* param group dicts (same order,
learning rates, betas, eps, weight decay and every other key, e.g. ``initial_lr``; the keys only
torch's Adam has are removed), so every LR scheduler built on the old optimizer -- nested ones such
as ``SequentialLR``'s children included -- keeps setting the learning rates the new one reads.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_memkit.config import DENSE_ONLY_OPTIMIZERS, MemKitConfigError, OptimizerConfig, check_number
from lightning_memkit.optim import OPTIMIZER_CLASSES
from lightning_memkit.optim.eight_bit import BNB_OPTIMIZERS, bnb_optimizer

#: keys of a torch Adam/AdamW group that carry no meaning for the rebuilt optimizer
_TORCH_ONLY_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad", "decoupled_weight_decay")


def read_optimizer(optimizer: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(param groups, defaults) of an AdamW/Adam optimizer, or MemKitConfigError saying why not."""
    kind = type(optimizer)
    if kind not in (torch.optim.AdamW, torch.optim.Adam):
        raise MemKitConfigError(
            f"memkit's optimizer setting rebuilds the optimizer configure_optimizers returned, but it cannot read "
            f"{kind.__module__}.{kind.__name__}: the memkit optimizers are AdamW variants, and only torch.optim.AdamW "
            "and torch.optim.Adam carry the same settings. Fix: return torch.optim.AdamW from configure_optimizers, "
            "or set the strategy's optimizer to 'none'."
        )
    if optimizer.state:
        raise MemKitConfigError("the optimizer to convert has already taken steps (its state is not empty); memkit "
                                "converts it when fitting starts, before any step.")
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        where = f"{kind.__name__} param group {i}"
        if group.get("amsgrad"):
            raise MemKitConfigError(
                f"{where} uses amsgrad=True, which no memkit optimizer implements. Fix: amsgrad=False.")
        if group.get("maximize"):
            raise MemKitConfigError(f"{where} uses maximize=True, which no memkit optimizer implements. Fix: minimize.")
        decoupled = kind is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        if group["weight_decay"] and not decoupled:
            raise MemKitConfigError(
                f"{where}: torch.optim.Adam with weight_decay={group['weight_decay']} adds L2 decay to the gradient; "
                "memkit's optimizers decay weights decoupled (AdamW). Converting would change the training. Fix: "
                "use torch.optim.AdamW (decoupled decay), or weight_decay=0."
            )
        if isinstance(group["lr"], Tensor) or isinstance(group["betas"][0], Tensor):
            raise MemKitConfigError(f"{where}: tensor learning rates / betas are not supported. Fix: use floats.")
        _check_group_numbers(where, group)
        for key in _TORCH_ONLY_KEYS:  # in place: the new optimizer takes over these very group dicts, so every
            group.pop(key, None)       # scheduler (SequentialLR's children too) keeps driving its learning rate
        groups.append(group)
    defaults = {k: optimizer.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
    return groups, defaults


def _check_group_numbers(where: str, group: dict[str, Any]) -> None:
    """Refuse a learning rate, betas, eps or weight decay that is NaN, infinite or out of range (torch's
    AdamW refuses NaN but takes an infinite lr, eps or weight decay, which turn the weights into NaN)."""
    fix = "set it to {what} where configure_optimizers builds the optimizer."
    for key in ("lr", "eps", "weight_decay"):
        check_number(f"{where}: {key}", group[key], minimum=0, fix=fix.format(what="a finite number >= 0"))
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise MemKitConfigError(f"{where}: betas={betas!r} must be two numbers. Fix: e.g. betas=(0.9, 0.999).")
    for i, beta in enumerate(betas):
        check_number(f"{where}: betas[{i}]", beta, minimum=0, maximum=1, max_exclusive=True,
                     fix=fix.format(what="a number in [0, 1), e.g. betas=(0.9, 0.999),"))


def is_linear_layer(module: nn.Module) -> bool:
    """An ``nn.Linear``, or Hugging Face's ``Conv1D`` (GPT-2's linear layer: the same product with the weight stored
    transposed, (in, out)); the low-rank rules act on any 2-D weight, whichever side is the longer."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")
            and isinstance(weight, Tensor) and weight.ndim == 2)


def linear_weights_in_blocks(module: nn.Module) -> dict[str, nn.Module]:
    """name -> linear layer (:func:`is_linear_layer`) for every linear layer inside the model's transformer blocks."""
    from lightning_memkit.models.interface import find_blocks

    blocks = find_blocks(module)
    inside = {id(m) for block in blocks for m in block.modules()}
    return {name: m for name, m in module.named_modules() if is_linear_layer(m) and id(m) in inside}


#: names PEFT gives the modules / parameter dicts of LoRA's two factors (``q_proj.lora_A.default``, ...)
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def is_lora_name(name: str) -> bool:
    """Whether ``name`` (a module or parameter name) lies inside a PEFT LoRA factor (``lora_A`` / ``lora_B`` /
    ``lora_embedding_A`` / ``lora_embedding_B``)."""
    return any(part in LORA_PARTS for part in name.split("."))


def lora_weights(module: nn.Module) -> dict[Tensor, str]:
    """param -> name of the trainable PEFT LoRA factors of ``module`` (already low-rank: they stay on AdamW unless
    ``optimizer.target_modules`` names them)."""
    return {p: name for name, p in module.named_parameters() if p.requires_grad and is_lora_name(name)}


def _two_d_weights(module: nn.Module) -> dict[str, tuple[Tensor, str]]:
    """module name -> (2-D weight, its parameter name) of every module with one (a PEFT layer's ``weight`` is its
    base layer's), and of every 2-D entry of PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` parameter dicts
    (named ``<dict>.<adapter>``, a name that is both)."""
    found: dict[str, tuple[Tensor, str]] = {}
    for name, m in module.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.ndim == 2:
            found[name] = (weight, f"{name}.weight")
        if isinstance(m, nn.ParameterDict) and name.rsplit(".", 1)[-1] in LORA_PARTS:
            found.update({f"{name}.{key}": (p, f"{name}.{key}") for key, p in m.items() if p.ndim == 2})
    return found


def select_lowrank(module: nn.Module, patterns: Optional[tuple[str, ...]]) -> dict[Tensor, str]:
    """param -> name of the trainable 2-D weights that get the low-rank rule.

    Frozen weights (``requires_grad=False``) are never chosen: they take no step. ``patterns=None``:
    the weights of every ``nn.Linear`` inside the transformer blocks (so embeddings, the LM head, norms
    and biases stay dense, as in the papers), except PEFT's LoRA factors (``lora_A`` / ``lora_B``),
    which are low-rank already and stay on AdamW. Otherwise the 2-D weight of every module whose name
    matches a pattern (fnmatch), LoRA factors included when a pattern names them; a pattern that
    matches no module, or only frozen weights, raises, listing candidates.

    Raises:
        MemKitConfigError: no linear layer in the blocks (``patterns=None``); a pattern that matches no
            module with a 2-D weight, or only frozen ones.
    """
    if patterns is None:
        linears = linear_weights_in_blocks(module)
        if not linears:
            raise MemKitConfigError(
                "optimizer: found no nn.Linear inside transformer blocks (nor GPT-2's Conv1D) to give the low-rank "
                "rule (no block list recognized, or blocks without linear layers). "
                "Fix: name the modules with optimizer.target_modules, "
                "e.g. ['*.q_proj', '*.fc*'], or declare the blocks with a memkit_blocks() method."
            )
        return {m.weight: f"{name}.weight" for name, m in linears.items()
                if m.weight.requires_grad and not is_lora_name(name)}
    candidates = _two_d_weights(module)
    result: dict[Tensor, str] = {}
    for pattern in patterns:
        hits = [name for name in candidates if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            sample = ", ".join(list(candidates)[:8]) + (", ..." if len(candidates) > 8 else "")
            raise MemKitConfigError(
                f"optimizer.target_modules pattern {pattern!r} matches no module with a 2-D weight. Candidates: "
                f"{sample}. Fix: a pattern such as "
                f"'*{list(candidates)[0].rsplit('.', 1)[-1] if candidates else 'proj'}'."
            )
        trainable = [name for name in hits if candidates[name][0].requires_grad]
        if not trainable:
            lora = any(is_lora_name(n) for n in candidates)
            hint = "the LoRA factors of this PEFT model, ['*.lora_A.*', '*.lora_B.*'], or " if lora else ""
            raise MemKitConfigError(
                f"optimizer.target_modules pattern {pattern!r} matches only frozen weights (requires_grad=False): "
                f"{', '.join(hits[:4])}{', ...' if len(hits) > 4 else ''}. A frozen weight takes no optimizer step, so "
                f"the pattern would choose nothing. Fix: name trainable modules ({hint}modules you do not freeze), "
                "or drop the pattern."
            )
        for name in trainable:
            weight, param_name = candidates[name]
            result.setdefault(weight, param_name)
    return result


def convert_optimizer(optimizer: torch.optim.Optimizer, config: OptimizerConfig, lowrank: dict[Tensor, str],
                      names: Optional[dict[Tensor, str]] = None) -> torch.optim.Optimizer:
    """The memkit optimizer ``config.name`` over ``optimizer``'s param groups.

    Args:
        optimizer: what ``configure_optimizers`` returned.
        config: the optimizer settings.
        lowrank: param -> name of the weights that get the low-rank rule (the trainable ones in this optimizer
            are used).
        names: param -> name of every parameter, for messages.
    """
    groups, defaults = read_optimizer(optimizer)
    params = {p for g in groups for p in g["params"]}
    if config.name in BNB_OPTIMIZERS:
        return bnb_optimizer(config.name, groups, **defaults)
    cls = OPTIMIZER_CLASSES.get(config.name)
    if cls is None:
        raise MemKitConfigError(f"optimizer={config.name!r} has no optimizer class; use one of "
                                f"{sorted([*OPTIMIZER_CLASSES, *BNB_OPTIMIZERS])}.")
    kwargs = config.optimizer_kwargs()
    if config.name not in DENSE_ONLY_OPTIMIZERS:
        kwargs["lowrank_params"] = [p for p in lowrank if p in params and p.requires_grad]  # frozen: no step
    all_names = {**(names or {}), **lowrank}
    try:
        return cls(groups, **defaults, names=all_names, **kwargs)
    except ValueError as err:  # e.g. a rank larger than a chosen weight: name it at setup
        raise MemKitConfigError(f"optimizer {config.name!r}: {err}") from None
