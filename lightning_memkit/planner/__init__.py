"""Will it fit? ``plan`` (one full-size step on fake tensors, by category), the auto mode's ``choose``,
and ``verify`` (each technique against the plain step). Loaded lazily: ``lightning_memkit.loss`` imports
the tracker's hook."""

from __future__ import annotations

from typing import Any

__all__ = ["plan", "plot", "candidates", "choose", "longest_sequence", "verify", "Setting"]


def __getattr__(name: str) -> Any:
    if name in ("plan", "plot", "candidates", "choose", "longest_sequence"):
        from lightning_memkit.planner import plans

        return getattr(plans, name)
    if name == "verify":
        from lightning_memkit.planner.verify import verify

        return verify
    if name == "Setting":
        from lightning_memkit.planner.step import Setting

        return Setting
    raise AttributeError(name)
