"""The MNI152NLin2009cAsym grids that fMRIPrep writes, built without downloading TemplateFlow.

TemplateFlow's ``tpl-MNI152NLin2009cAsym_res-01`` grid is 193 x 229 x 193 at 1 mm and ``res-02`` is
97 x 115 x 97 at 2 mm, both with the first voxel centre at (-96, -132, -78) mm. Coarser grids used
for fast tests keep the same bounding box.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fcflow.errors import InputDataError

MNI_SPACE = "MNI152NLin2009cAsym"
_ORIGIN_MM = np.array([-96.0, -132.0, -78.0])
_EXTENT_MM = np.array([192.0, 228.0, 192.0])


def mni_grid(resolution_mm: float) -> tuple[tuple[int, int, int], NDArray[np.float64]]:
    """Return ``(shape, affine)`` of the MNI152NLin2009cAsym grid at an isotropic resolution.

    Parameters
    ----------
    resolution_mm : float
        Voxel size in mm; 1 and 2 give TemplateFlow's ``res-01`` and ``res-02`` grids.

    Returns
    -------
    shape : tuple of 3 int
    affine : ndarray of shape (4, 4)
        RAS+ voxel-to-world matrix in mm.
    """
    if not resolution_mm > 0:
        raise InputDataError(f"'resolution_mm' must be a positive number. Got {resolution_mm!r}.")
    shape = tuple(int(n) for n in np.floor(_EXTENT_MM / resolution_mm + 1e-9).astype(int) + 1)
    affine = np.diag([resolution_mm, resolution_mm, resolution_mm, 1.0])
    affine[:3, 3] = _ORIGIN_MM
    return shape, affine  # type: ignore[return-value]
