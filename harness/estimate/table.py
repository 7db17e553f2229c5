"""Plain-text tables whose columns fit their widest cell, so numbers never run into each other
whatever their size (a 70B model's collectives move hundreds of GiB)."""

from __future__ import annotations

from typing import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "", left: int = 1) -> list[str]:
    """The first `left` columns left-aligned (labels), the rest right-aligned (numbers); two
    spaces between columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for cells in (header, *rows):
        parts = [str(cell).ljust(w) if i < left else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        lines.append(indent + "  ".join(parts).rstrip())
    return lines


def size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes:,.0f} B"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"
