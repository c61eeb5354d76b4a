"""One procedural phantom case: its random streams, its parameters and the rendering that puts the parts
together (anatomy -> tissue classes -> HU -> textures, vessels, tumours -> image formation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..image_io import Geometry, Image
from .abdomen import AbdomenPainting
from .anatomy import Anatomy
from .lesions import Lesions, finish_tumour_entries
from .scanner import SIZES, Acquisition
from .textures import Textures
from .tissues import TISSUES, Tissue, levels_lut, tissue_levels
from .torso import TorsoPainting
from .vessels import LiverVessels

PHANTOM_VERSION = 1

#: Separate random streams per concern, so that e.g. the image size changes nothing but the grid.
STREAM_ANATOMY, STREAM_TUMOURS, STREAM_SCAN, STREAM_NOISE, STREAM_TEXTURE, STREAM_SHAPES, STREAM_LEVELS = range(7)


@dataclass
class Phantom:
    """One synthetic CT case.

    ``image`` holds int16 HU in the canonical orientation; ``label`` (uint8: 0/1/2) and ``tissues`` (uint8
    ids of :data:`TISSUES`) are on the same grid. ``tumours`` has one entry per generated tumour (centre in
    LPS millimetres and as a (z, y, x) voxel index, nominal diameter, kind, what it touches, and its voxel
    count in the label). ``meta`` records the seed, size, grid and acquisition parameters.
    """

    image: Image
    label: np.ndarray
    tissues: np.ndarray
    tumours: list[dict]
    meta: dict = field(default_factory=dict)


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a dataset generated with ``seed`` (deterministic, well mixed)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)
    return int(state[0] & 0x7FFFFFFF)


def random_stream(seed: int, stream: int, *extra: int) -> np.random.Generator:
    """The random stream ``stream`` (one of ``STREAM_*``) of case ``seed``."""
    return np.random.default_rng([int(seed), 7919, stream, *extra])


class Case(Acquisition, TorsoPainting, AbdomenPainting, Textures, LiverVessels, Lesions):
    """Draws one case's parameters and renders it onto its grid (each concern in its own mixin module)."""

    def __init__(self, seed: int, size: str):
        if size not in SIZES:
            raise ValueError(f"unknown phantom size {size!r}; use one of {sorted(SIZES)}")
        if int(seed) < 0:
            raise ValueError("seed must be a non-negative integer")
        self.seed, self.size = int(seed), size
        self.anat = Anatomy(random_stream(seed, STREAM_ANATOMY))
        self._scan_parameters(random_stream(seed, STREAM_SCAN))
        a = self.anat
        self.levels = tissue_levels(random_stream(seed, STREAM_LEVELS), self.phase, self.contrast,
                                    steatosis=a.steatosis, sludge=bool(a.gb and a.gb["sludge"]),
                                    age_factor=a.age_factor)
        self.rng_tum = random_stream(seed, STREAM_TUMOURS)
        self.rng_tex = random_stream(seed, STREAM_TEXTURE)
        self.rng_shape = random_stream(seed, STREAM_SHAPES)  # anatomy-defined fields (grid independent)
        self.rng_noise = random_stream(seed, STREAM_NOISE, list(SIZES).index(size))

    def render(self) -> Phantom:
        """Paint the tissues, turn them into HU with textures, vessels and tumours, form the image."""
        a = self.anat
        g = self.grid = self.make_grid()
        tissue = np.zeros(g.shape, np.uint8)
        self.tissue = tissue
        self._paint_table()
        self._paint_body()
        self._paint_thorax()
        self._paint_spine()
        self._paint_ribs()
        self._paint_retroperitoneum()
        self._paint_gi()
        self._paint_liver()
        self._paint_after_liver()
        # HU from tissue classes, then textures and soft (partial-volume) structures
        hu = levels_lut(self.levels)[tissue]
        self.hu = hu
        self._textures()
        self._liver_vessels()
        tumours = self._tumours()
        label = np.zeros(g.shape, np.uint8)
        if self.liver_sl is not None:
            view = label[self.liver_sl]
            view[self.liver_mask] = 1
            view[self.tumour_mask] = 2
        self._image_formation()
        np.clip(hu, -1024, 3071, out=hu)
        np.rint(hu, out=hu)
        image = hu.astype(np.int16)
        del self.hu, hu
        if self.circular:  # reconstruction circle: outside it the scanner writes padding
            outside = self._outside_circle()
            for k in range(g.shape[0]):
                image[k][outside] = -1024
                tissue[k][outside] = Tissue.AIR
                label[k][outside] = 0
        finish_tumour_entries(tumours, image, label, g.spacing)
        geometry = Geometry(tuple(float(s) for s in g.spacing), tuple(float(o) for o in g.origin),
                            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        liver_ml = float(np.count_nonzero(label)) * float(np.prod(g.spacing)) / 1000.0
        meta = dict(
            generator="LiverTumorSegLib.phantoms", version=PHANTOM_VERSION, seed=self.seed, size=self.size,
            spacing=[float(s) for s in g.spacing], shape=[int(s) for s in g.shape],
            origin=[float(o) for o in g.origin],
            phase=self.phase, contrast_scale=round(self.contrast, 4), noise_sigma_hu=round(self.noise_sigma, 3),
            liver_hu=round(float(self.levels[Tissue.LIVER]), 2), portal_vein_hu=round(float(self.levels[Tissue.VESSEL]), 2),
            hepatic_vein_hu=round(float(self.levels["hepatic_veins"]), 2),
            spleen_hu=round(float(self.levels[Tissue.SPLEEN]), 2),
            fov_mm=round(self.fov, 2), circular_fov=bool(self.circular),
            body_offset_mm=[round(float(v), 2) for v in self.body_offset],
            kernel_blur=round(self.kernel_a, 4), steatosis=bool(a.steatosis), cirrhosis=bool(a.cirrhosis),
            ascites=bool(a.ascites), gallbladder=a.gb is not None, oral_contrast=bool(a.oral),
            liver_volume_ml=round(liver_ml, 2), tumour_count=len(tumours),
            hu_levels={TISSUES[k]: round(float(v), 1) for k, v in self.levels.items() if isinstance(k, int)},
        )
        return Phantom(Image(image, geometry), label, tissue, tumours, meta)


def generate_phantom(seed: int, size: str = "small") -> Phantom:
    """Generate one synthetic CT case (deterministic in ``seed``).

    ``size="full"``: 512x512 pixels of 0.6-0.9 mm and 1-5 mm slices (40-320 slices).
    ``size="small"``: the same patient on a 128x128 grid (2.4-3.6 mm pixels, 3-5 mm slices), for tests.
    """
    return Case(seed, size).render()
