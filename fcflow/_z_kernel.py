"""Compiled (numba) table lookup behind :class:`fcflow.stats.ZTable`.

Imported lazily, as :mod:`fcflow._tfce_kernel`; compiled code is cached in ``__pycache__``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def interpolate(values, signed, origin, lower, scale, z_grid, slope, out):
    """Linear interpolation of z in a uniform grid of r, in one pass over ``values``.

    r is ``|value|`` (``signed``: z takes the sign of the value, t) or ``log(value)`` (F).
    Elements with r below ``lower`` or beyond the grid are left for the exact conversion:
    they are set to NaN, and their count is returned.
    """
    n_grid = z_grid.shape[0] - 1
    n_outside = 0
    for k in range(values.shape[0]):
        v = values[k]
        if signed:
            r = abs(v)
        elif v > 0:
            r = np.log(v)
        else:
            r = -np.inf
        position = (r - origin) * scale
        if r < lower or not position < n_grid:  # NaN included
            out[k] = np.nan
            n_outside += 1
            continue
        i = int(position)
        z = z_grid[i] + (position - i) * slope[i]
        out[k] = -z if signed and v < 0 else z
    return n_outside
