"""`transpose_into(out, matrix)`: out[...] = matrix.T, fast for the big weight matrices of a checkpoint.

Converting GLM-4 between torch ([out, in]) and Paddle ([in, out]) layouts is mostly transposing, and
numpy's own strided copy is slow at it: it moves one 2-byte value per step and jumps a whole row of the
source between steps (about 0.1-0.4 GB/s for bf16 here, slower than the disk). Moving 16-byte units
instead (8 bf16 or 4 fp32 values of a row) makes 8 or 4 times fewer jumps, and working on tiles keeps both
sides in the CPU cache; a second, cheap pass then spreads each unit's values over their output rows.
Values are only moved, never interpreted, so bf16 (held as raw uint16 bits) is copied bit for bit.
"""

from __future__ import annotations

import numpy as np

_UNIT = np.dtype("V16")  # moved as one opaque item; no alignment required
_TILE_BYTES = 256 * 1024  # one tile of the source, in units: fits the L2 cache
_TILE_UNITS = 16  # units per row of a tile: tall tiles write longer runs of each output row


def transpose_into(out: np.ndarray, matrix: np.ndarray) -> None:
    """Copy `matrix.T` into `out` (shape [cols, rows]). `matrix` may be a column slice of a bigger matrix."""
    rows, cols = matrix.shape
    k = _UNIT.itemsize // matrix.itemsize  # values per unit
    fast = (
        matrix.itemsize in (2, 4)
        and out.dtype == matrix.dtype
        and matrix.strides[1] == matrix.itemsize
        and out.strides[1] == out.itemsize
    )
    wide = cols - cols % k if fast else 0  # columns done by whole units; the rest the plain way
    if wide:
        units = matrix[:, :wide].view(_UNIT)  # [rows, wide / k]
        n_units = units.shape[1]
        tile_units = min(n_units, _TILE_UNITS)
        tile_rows = max(256, _TILE_BYTES // (tile_units * _UNIT.itemsize))
        for r in range(0, rows, tile_rows):
            for g in range(0, n_units, tile_units):
                tile = np.ascontiguousarray(units[r : r + tile_rows, g : g + tile_units].T)  # [units, rows]
                count, height = tile.shape
                values = tile.view(matrix.dtype).reshape(count, height, k)
                # values[u, i, j] = matrix[r + i, (g + u) * k + j], which goes to out[(g + u) * k + j, r + i]
                out[g * k : (g + count) * k, r : r + height].reshape(count, k, height)[...] = values.transpose(0, 2, 1)
    if wide < cols:
        out[wide:] = matrix[:, wide:].T
