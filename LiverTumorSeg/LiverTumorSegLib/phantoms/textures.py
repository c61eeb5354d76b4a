"""Tissue texture: a smooth random field (mottling, perfusion differences) or uncorrelated noise added to
the HU of one tissue class inside a box of the image (the reconstruction blur correlates it later)."""

from __future__ import annotations

import numpy as np

from .grid import Grid, sample_box
from .fields import RandomField
from .tissues import Tissue


def add_field_texture(grid: Grid, hu: np.ndarray, tissue: np.ndarray, sl, tid: int, sigma: float, length: float,
                      rng: np.random.Generator, extra=None, slow=None) -> None:
    """Add ``sigma`` x a unit random field of correlation ``length`` mm (plus ``extra`` HU) to the voxels of
    tissue ``tid`` in the box ``sl``; ``slow`` = (sigma, length) adds a slowly varying component too."""
    if sl is None or sigma <= 0:
        return
    view = tissue[sl]
    mask = view == tid
    if not mask.any():
        return
    P = grid.points(sl)
    lo = (float(P.x[0]), float(P.y[0]), float(P.z[0]))
    hi = (float(P.x[-1]), float(P.y[-1]), float(P.z[-1]))
    fld = RandomField(rng, lo, hi, length)
    if slow is None:
        fn = fld
    else:  # add a slowly varying component (e.g. perfusion differences across the liver)
        fld2 = RandomField(rng, lo, hi, slow[1])
        ratio = np.float32(slow[0] / max(sigma, 1e-3))
        fn = lambda P: fld(P) + ratio * fld2(P)  # noqa: E731
    t = sample_box(grid, sl, fn, length / 3.0, length / 3.0)
    t *= sigma
    if extra is not None:
        t += extra
    t *= mask
    hu[sl] += t


def add_white_texture(hu: np.ndarray, tissue: np.ndarray, sl, tid: int, sigma: float, rng: np.random.Generator) -> None:
    """Uncorrelated texture of ``sigma`` HU inside ``tid`` in the box ``sl`` (correlated later by the
    reconstruction blur)."""
    if sl is None:
        return
    view = tissue[sl]
    mask = view == tid
    n = int(np.count_nonzero(mask))
    if n:
        hv = hu[sl]
        hv[mask] += rng.standard_normal(n, dtype=np.float32) * np.float32(sigma)


class Textures:
    """Tissue textures of a procedural case (mixed into :class:`.case.Case`)."""

    def _field_texture(self, sl, tid, sigma, length, extra=None, slow=None):
        add_field_texture(self.grid, self.hu, self.tissue, sl, tid, sigma, length, self.rng_tex, extra, slow)

    def _white_texture(self, sl, tid, sigma):
        add_white_texture(self.hu, self.tissue, sl, tid, sigma, self.rng_tex)

    def _textures(self):
        """Textures of a procedural case: liver mottling and perfusion, spleen, lungs (dependent density),
        marrow, stool, food, fat and muscle septa, bowel fluid."""
        L, a, g = self.levels, self.anat, self.grid
        # liver parenchyma: fine mottling plus a slow perfusion gradient
        if self.liver_sl is not None:
            self._field_texture(self.liver_sl, Tissue.LIVER, L["liver_texture"], 8.0, slow=(3.0, 60.0))
        if getattr(self, "spleen_sl", None) is not None:
            self._field_texture(self.spleen_sl, Tissue.SPLEEN, L["spleen_texture"], 7.0)
        # lungs: dependent density gradient (posterior bases), pulmonary vessels
        if getattr(self, "thorax_sl", None) is not None:
            sl = self.thorax_sl
            P = g.points(sl)
            dep = (np.clip((P.Y - (a.y_back - 70.0)) / 70.0, 0, 1) * L["lung_dependent"]).astype(np.float32)
            view = self.tissue[sl]
            hv = self.hu[sl]
            for k in range(view.shape[0]):
                m = view[k] == Tissue.LUNG
                hv[k][m] += np.broadcast_to(dep[0], m.shape)[m]
            self._white_texture(sl, Tissue.LUNG, 15.0)
        # bone marrow (trabecular), stool, stomach food
        self._white_texture((slice(None), slice(None), slice(None)), Tissue.MARROW, L["marrow_texture"])
        if getattr(self, "colon_sl", None) is not None:
            hv = self.hu[self.colon_sl]
            m = self.tissue[self.colon_sl] == Tissue.STOOL
            hv[m] += 60.0 * self.colon_field[m]
            self._white_texture(self.colon_sl, Tissue.STOOL, 35.0)
        if a.stomach["content"] == "food":
            self._field_texture(getattr(self, "stomach_sl", None), Tissue.STOMACH_FLUID, 30.0, 6.0, extra=np.float32(25.0))
        # fat and muscle: faint texture (septa, fatty streaks), slice by slice
        sf, sm = np.float32(L["fat_texture"] / 40.0), np.float32(L["muscle_texture"] / 40.0)
        scale = np.zeros(256, np.float32)
        scale[Tissue.FAT], scale[Tissue.MUSCLE] = sf, sm
        for k in range(g.shape[0]):
            self.hu[k] += self.body_texture[k] * scale[self.tissue[k]]
        del self.body_texture
        # bowel lumen fluid darker than the enhancing wall
        if getattr(self, "bowel_sl", None) is not None:
            hv = self.hu[self.bowel_sl]
            hv[self.bowel_lumen & (self.tissue[self.bowel_sl] == Tissue.BOWEL)] = L["bowel_fluid"]
