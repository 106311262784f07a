"""Boxes of cells on a ViT's token grid, and the one "central region" that audits and ``perturb`` share.

A box is ``(row0, col0, row1, col1)``, end-exclusive, in token-grid cells. The central
region is what an audit's ``central_share`` measures relevance in and what ``perturb``
drops by default, so that "central" means the same cells in both results: the cells whose
centre lies strictly inside the central box of half the grid's height and half its width
(openapi.yaml, ``RelevanceLocation``).
"""

from __future__ import annotations

Region = tuple[int, int, int, int]


def _central_cells(size: int) -> tuple[int, int]:
    """``(start, stop)`` of the cells ``i`` of one axis with ``|i + 0.5 - size / 2| < size / 4``.

    In integers (``|4 i + 2 - 2 size| < size``), so no rounding decides a border cell. The
    cells form one run; an axis of 2 cells has none (both centres lie on the box's edge).
    """
    inside = [i for i in range(size) if abs(4 * i + 2 - 2 * size) < size]
    return (inside[0], inside[-1] + 1) if inside else (size // 2, size // 2)


def central_box(grid: tuple[int, int]) -> Region:
    """The central region of an ``h x w`` grid: 3x3 of 7x7, 2x2 of 4x4, 6x6 of 14x14.

    The box covers a quarter of the area; on a coarse grid its cells cover a little less
    (9 of 49 on 7x7). Empty (``row0 == row1`` or ``col0 == col1``) where an axis has 2 cells.
    """
    (row0, row1), (col0, col1) = _central_cells(grid[0]), _central_cells(grid[1])
    return row0, col0, row1, col1
