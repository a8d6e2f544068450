"""Byte units and the one byte formatter every table and message uses (imports nothing from the package)."""

from __future__ import annotations

KIB = 2**10
MIB = 2**20
GIB = 2**30


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least a quarter: ``"14.96 GiB"``, ``"1.95 MiB"``,
    ``"0.50 KiB"``, ``"100 B"`` (negative sizes, such as an overshoot, keep their sign)."""
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale / 4:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def table_unit(largest: float) -> tuple[str, int]:
    """The unit for a table whose largest value is ``largest`` bytes: ``("GiB", GIB)`` from a quarter GiB up,
    ``("MiB", MIB)`` below (so a small model's table is not all zeros)."""
    return ("GiB", GIB) if largest >= GIB / 4 else ("MiB", MIB)


def in_unit(n: float, scale: int) -> str:
    """``n`` bytes as a number of ``scale``-byte units with two decimals (a table cell: ``"14.96"``)."""
    return f"{n / scale:.2f}"
