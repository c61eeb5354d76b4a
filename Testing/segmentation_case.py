"""The small label map the segmentation-file tests share (test_seg_nrrd, test_mrml_nodes): a box liver with
two lesions on a grid whose non-unit spacing, offset origin and flipped, permuted axes expose any LPS/RAS or
axis-order slip."""

import numpy as np

from LiverTumorSegLib.image_io import Geometry

GEOMETRY = Geometry(spacing=(0.8, 0.7, 2.5), origin=(12.5, -40.0, 101.0),
                    direction=(-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0))
SHAPE = (12, 20, 24)  # z, y, x


def labels(tumour: bool = True) -> np.ndarray:
    """Liver (1) box of 8·14·16 voxels; with ``tumour``, two lesions (2) of 90 and 9 voxels."""
    out = np.zeros(SHAPE, dtype=np.uint8)
    out[2:10, 3:17, 4:20] = 1
    if tumour:
        out[3:6, 5:10, 6:12] = 2  # big lesion: 3*5*6 = 90 voxels
        out[7:9, 12:14, 15:17] = 2  # small lesion: 8 voxels
        out[9, 14, 17] = 2  # touches the small one only at a corner: same lesion (26-connected)
    return out
