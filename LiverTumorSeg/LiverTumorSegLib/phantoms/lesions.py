"""Liver tumours: how many, which kind (hypodense, hyperdense, rim-enhancing, necrotic, cystic, calcified),
shape (round, lobulated, irregular) and size (3-80 mm, small ones frequent), where (inside the parenchyma,
at the capsule, against a vessel), their HU relative to the liver per contrast phase, and painting with
partial-volume margins (sharp or blurred). The functions work on any liver mask on any grid; the
:class:`Lesions` mixin applies them to a procedural case."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fields import RandomField, ellipsoid_distance, local_coordinates, smooth_min
from .grid import Grid
from .tissues import DELAYED, Tissue
from .vessels import ANATOMY_STEP_MM

TUMOUR_TYPES = ("hypodense", "hyperdense", "rim_enhancing", "necrotic", "cystic", "calcified")
TYPE_PROBABILITIES = (0.36, 0.12, 0.15, 0.12, 0.17, 0.08)
TUMOUR_SHAPES = ("round", "lobulated", "irregular")
SHAPE_PROBABILITIES = (0.5, 0.25, 0.25)
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 80.0
COUNT_PROBABILITIES = (0.15, 0.25, 0.15, 0.12, 0.10, 0.08, 0.06, 0.05, 0.04)  # P(0..8 tumours)


def tumour_levels(rng: np.random.Generator, kind: str, phase: str, liver: float, c: float) -> dict:
    """HU of the parts of one tumour of ``kind`` (relative to the liver parenchyma ``liver``)."""
    u = rng.uniform
    pv, la, dl = phase == "portal_venous", phase == "late_arterial", phase == DELAYED

    def rel(pv_range, la_range, un_range, dl_range=None):
        """HU relative to the liver; the delayed phase uses ``dl_range`` (default: 0.8 x the portal-venous one)."""
        if dl:
            r = u(*(dl_range or (0.8 * pv_range[0], 0.8 * pv_range[1])))
        else:
            r = u(*pv_range) if pv else u(*la_range) if la else u(*un_range)
        return r * (c if r > 0 and (pv or la or dl) else 1.0)

    t = dict(texture=u(4, 12))
    if kind == "hypodense":
        t["base"] = liver + rel((-60, -20), (-50, -15), (-25, -5))
    elif kind == "hyperdense":
        t["base"] = liver + rel((15, 50), (25, 80), (3, 12), (-20, 8))  # delayed: washout
    elif kind == "rim_enhancing":
        t["base"] = liver + rel((-60, -30), (-50, -20), (-25, -10))
        t["rim"] = liver + rel((0, 30), (20, 60), (-8, 0))
        t["rim_mm"] = u(1.5, 4.0)
    elif kind == "necrotic":
        t["base"] = liver + rel((-35, -10), (-30, 5), (-20, -5))
        t["core"] = u(5, 25)
        t["core_frac"] = u(0.35, 0.65)
    elif kind == "cystic":
        t["base"] = u(0, 20)
        t["texture"] = u(1, 3)
    elif kind == "calcified":
        t["base"] = liver + rel((-40, -15), (-35, -10), (-20, -5))
        t["calc"] = u(300, 900)
        t["dense"] = u(200, 600)
    return t


@dataclass
class TumourSpec:
    """One tumour to paint: kind, shape, margin, size and place, HU levels and the details of its shape."""

    kind: str
    shape: str
    margin: str
    radius: float
    centre: np.ndarray  # patient frame (x, y, z)
    touches: list
    levels: dict
    blur_mm: float
    ellipse: tuple
    rot: np.ndarray
    lobes: list
    field_seed: int
    calcs: list


def draw_tumour_specs(rng: np.random.Generator, count: int, dominant: str, pts_all: np.ndarray, dep_all: np.ndarray,
                      segs, step: float, phase: str, liver_hu: float, contrast: float,
                      min_diameter: float = MIN_DIAMETER_MM, max_diameter: float = MAX_DIAMETER_MM) -> list[TumourSpec]:
    """Draw ``count`` tumours (kind mostly ``dominant``; log-uniform diameters; necrotic ones at least 20 mm,
    rim-enhancing ones at least 8 mm) and place each at one of the candidate points ``pts_all`` (patient
    frame, on a grid of ``step`` mm) whose organ depth ``dep_all`` suits its mode: inside the parenchyma,
    bulging the capsule, or against a vessel of ``segs``. Tumours do not overlap; a tumour that finds no
    place shrinks and tries again, up to eight times."""
    specs: list[TumourSpec] = []
    for _ in range(count):
        kind = dominant if rng.uniform() < 0.65 else str(rng.choice(TUMOUR_TYPES, p=TYPE_PROBABILITIES))
        d = float(np.exp(rng.uniform(np.log(min_diameter), np.log(max_diameter))))
        if kind == "necrotic" and d < 20:
            d = float(rng.uniform(20, 60))
        if kind == "rim_enhancing" and d < 8:
            d = float(rng.uniform(8, 30))
        mode = str(rng.choice(["interior", "capsule", "vessel"], p=[0.5, 0.25, 0.25]))
        shape = "round" if kind == "cystic" else str(rng.choice(TUMOUR_SHAPES, p=SHAPE_PROBABILITIES))
        margin = "sharp" if kind == "cystic" or rng.uniform() < 0.6 else "blurred"
        draws = rng.uniform(size=8)
        spec = None
        for attempt in range(8):
            R = d / 2
            if mode == "capsule":
                ok = (dep_all >= max(0.55 * R, 4.0)) & (dep_all <= max(0.95 * R, 5.0))
            elif mode == "vessel":
                ok = dep_all >= max(0.9 * R + 1.0, 4.0)
            else:
                ok = dep_all >= R + 1.5
            idx = np.where(ok)[0]
            if idx.size and specs:
                cen = np.array([s.centre for s in specs])
                rad = np.array([s.radius for s in specs])
                dd = np.linalg.norm(pts_all[idx, None, :] - cen[None], axis=2)
                idx = idx[(dd >= 0.9 * (R + rad[None])).all(axis=1)]
            if idx.size and mode == "vessel" and segs:
                sub = idx if idx.size <= 3000 else idx[np.linspace(0, idx.size - 1, 3000).astype(int)]
                dv = vessel_distance(pts_all[sub], segs)
                near = sub[(dv >= R - 0.5) & (dv <= R + 1.0)]
                idx = near if near.size else idx
            if idx.size:
                j = idx[int(draws[attempt] * idx.size) % idx.size]
                centre = pts_all[j] + rng.uniform(-0.5, 0.5, 3) * step
                spec = tumour_spec(rng, kind, shape, margin, R, centre, float(dep_all[j]), segs, phase, liver_hu,
                                   contrast)
                break
            d = max(min_diameter, d * 0.78)
        if spec is not None:
            specs.append(spec)
    return specs


def vessel_distance(pts: np.ndarray, segs) -> np.ndarray:
    """Distance (mm) from each point (n, 3) to the surface of the nearest vessel segment of ``segs``."""
    A = np.array([s[0] for s in segs])
    Bq = np.array([s[1] for s in segs])
    r = np.array([0.5 * (s[2] + s[3]) for s in segs])
    ab = Bq - A
    l2 = np.maximum((ab * ab).sum(1), 1e-6)
    d = pts[:, None, :] - A[None]
    t = np.clip((d * ab[None]).sum(2) / l2[None], 0, 1)
    e = d - t[..., None] * ab[None]
    return (np.sqrt((e * e).sum(2)) - r[None]).min(axis=1)


def tumour_spec(rng, kind, shape, margin, R, centre, depth, segs, phase: str, liver_hu: float, contrast: float) -> TumourSpec:
    """Draw the appearance of one tumour of radius ``R`` at ``centre`` (``depth`` mm inside the liver): HU of its
    parts, ellipticity and orientation, lobes, calcifications, margin blur, and what it touches."""
    levels = tumour_levels(rng, kind, phase, liver_hu, contrast)
    e = rng.uniform(0.8, 1.2, 3)
    e = e / np.prod(e) ** (1 / 3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lobes = []
    if shape == "lobulated":
        for _ in range(int(rng.integers(2, 5))):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            lobes.append((v * rng.uniform(0.45, 0.7) * R, rng.uniform(0.35, 0.6) * R))
    calcs = []
    if kind == "calcified" and R >= 6:
        for _ in range(int(rng.integers(1, 5))):
            v = rng.normal(size=3)
            v /= np.linalg.norm(v)
            calcs.append((v * rng.uniform(0, 0.6) * R, rng.uniform(0.7, 2.5)))
    blur = float(rng.uniform(1.0, 3.0)) if margin == "blurred" else 0.0
    touches = []
    if depth - R <= 1.5:
        touches.append("capsule")
    if segs:
        dv = float(vessel_distance(np.asarray(centre, float)[None], segs)[0])
        if dv - R <= 1.5:
            touches.append("vessel")
    return TumourSpec(kind, shape, margin, float(R), np.asarray(centre, float), touches, levels, blur,
                       tuple(e), q.astype(np.float32), lobes, int(rng.integers(1 << 30)), calcs)


def render_tumour(grid: Grid, hu: np.ndarray, tissue: np.ndarray, liver_sl, liver_mask: np.ndarray,
                  tumour_mask: np.ndarray, tid: int, s: TumourSpec) -> dict:
    """Paint tumour ``s`` (number ``tid``) into ``hu`` with partial-volume occupancy, inside the liver only:
    ``liver_mask``/``tumour_mask`` cover the box ``liver_sl`` of the grid; voxels more than half inside become
    tumour in ``tissue`` and ``tumour_mask``. Returns the tumour's sidecar entry (its own voxels under
    ``_own``)."""
    g = grid
    c = s.centre.copy()
    # small lesions: keep the centre near a voxel centre along coarse axes so that they appear on a slice
    idx = g.to_index(c)
    for ax_xyz, ax_zyx in ((0, 2), (1, 1), (2, 0)):
        sp = g.spacing[ax_xyz]
        if 2 * s.radius < 2 * sp:
            snapped = round(idx[ax_zyx]) + (c[ax_xyz] * 0)  # nearest voxel centre
            jitter = ((s.field_seed >> (3 * ax_xyz)) % 7 - 3) / 12.0  # within +/- 0.25 voxel
            c[ax_xyz] += (snapped + jitter - idx[ax_zyx]) * sp
    R = s.radius
    ext = R * (1.3 if s.shape == "round" else 1.75) + s.blur_mm + 2 * max(g.spacing)
    sl = g.box(c - ext, c + ext)
    lps = g.to_lps(c)
    vox = [int(round(v)) for v in g.to_index(c)]
    entry = dict(id=tid, type=s.kind, shape=s.shape, margin=s.margin, diameter_mm=round(2 * R, 2),
                 centre_mm=[round(float(v), 3) for v in lps], centre_voxel=vox, touches=list(s.touches),
                 _own=None)
    if sl is None or liver_sl is None:
        return entry
    # restrict to the liver box
    ls = liver_sl
    sl = tuple(slice(max(b.start, l.start), min(b.stop, l.stop)) for b, l in zip(sl, ls))
    if any(b.stop <= b.start for b in sl):
        return entry
    P = g.points(sl)
    frng = np.random.default_rng(s.field_seed)
    lo = s.centre - (R * 1.75 + s.blur_mm + 6.0)  # field boxes independent of the image grid
    hi = s.centre + (R * 1.75 + s.blur_mm + 6.0)
    dx, dy, dz = local_coordinates(P.X, P.Y, P.Z, c, s.rot)
    if s.shape == "irregular":
        fld = RandomField(frng, lo, hi, max(0.8 * R, 3.0))
        fine = RandomField(frng, lo, hi, max(0.3 * R, 1.5))
        rad = R * (1 + 0.22 * fld(P) + 0.06 * fine(P))
        f = np.sqrt(dx * dx + dy * dy + dz * dz) - rad
    else:
        e = s.ellipse
        f = ellipsoid_distance(dx, dy, dz, R * e[0], R * e[1], R * e[2])
        if s.shape == "lobulated":
            f = f + 0.25 * R  # main body 0.75 R
            for off, rl in s.lobes:
                fl = np.sqrt((dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2) - rl
                f = smooth_min(f, fl, 0.2 * R)
    f = np.broadcast_to(f, P.shape).astype(np.float32)
    # partial-volume width: the voxel extent along the (radial) surface normal
    rr = np.sqrt((P.X - c[0]) ** 2 + (P.Y - c[1]) ** 2 + (P.Z - c[2]) ** 2) + 1e-3
    sx_, sy_, sz_ = (np.float32(v) for v in g.spacing)
    wv = np.sqrt(((P.X - c[0]) * sx_) ** 2 + ((P.Y - c[1]) * sy_) ** 2 + ((P.Z - c[2]) * sz_) ** 2) / rr
    o = np.clip(0.5 - f / (wv + s.blur_mm + 1e-3), 0, 1)
    if s.blur_mm > 0:
        o = o * o * (3 - 2 * o)
    # HU inside the tumour
    lv = s.levels
    tex = RandomField(frng, lo, hi, float(frng.uniform(2.5, 6.0)))(P) * np.float32(lv["texture"])
    v = np.float32(lv["base"]) + tex
    if s.kind == "rim_enhancing":
        inner = np.clip((-f - lv["rim_mm"]) / 1.5 + 0.5, 0, 1)
        v = v * inner + (np.float32(lv["rim"]) + 0.5 * tex) * (1 - inner)
    elif s.kind == "necrotic":
        nf = RandomField(frng, lo, hi, max(0.5 * R, 3.0))(P)
        rn = R * lv["core_frac"] * (1 + 0.3 * nf)
        core = np.clip((rn - np.sqrt(dx * dx + dy * dy + dz * dz)) / 2.0 + 0.5, 0, 1)
        v = v * (1 - core) + (np.float32(lv["core"]) + 0.3 * tex) * core
    elif s.kind == "calcified":
        if R < 6:
            v = np.float32(lv["dense"]) + tex
        for off, rc in s.calcs:
            dcal = np.sqrt((dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2) - rc
            ocal = np.clip(0.5 - dcal / (wv + 1e-3), 0, 1)
            v = v * (1 - ocal) + np.float32(lv["calc"]) * ocal
    local = tuple(slice(b.start - l.start, b.stop - l.start) for b, l in zip(sl, ls))
    in_liver = liver_mask[local] | tumour_mask[local]
    o = o * in_liver
    hv = hu[sl]
    hv += o * (v - hv)
    own = o > 0.5
    tissue[sl][own] = Tissue.TUMOUR
    tumour_mask[local] |= own
    entry["_own"] = (sl, own)
    return entry


def finish_tumour_entries(tumours: list[dict], image: np.ndarray, label: np.ndarray, spacing) -> None:
    """Complete the entries of :func:`render_tumour` with what each tumour's own label voxels hold in the
    final ``image`` (voxel count, mean HU, volume), in place."""
    for t in tumours:
        own = t.pop("_own")
        if own is None:
            t["voxels"], t["mean_hu"] = 0, None
        else:
            sl, mask = own
            mask = mask & (label[sl] == 2)
            t["voxels"] = int(np.count_nonzero(mask))
            t["mean_hu"] = round(float(image[sl][mask].mean()), 1) if t["voxels"] else None
        t["volume_ml"] = round(t["voxels"] * float(np.prod(spacing)) / 1000.0, 4)


class Lesions:
    """Tumours of a procedural case (mixed into :class:`.case.Case`)."""

    def _tumours(self) -> list[dict]:
        """Draw, place and paint this case's tumours in the liver; returns their sidecar entries."""
        g = self.grid
        rng = self.rng_tum
        count = int(rng.choice(len(COUNT_PROBABILITIES), p=COUNT_PROBABILITIES))
        dominant = str(rng.choice(TUMOUR_TYPES, p=TYPE_PROBABILITIES))
        if self.liver_sl is None or getattr(self, "liver_mask", None) is None:
            return []
        P, inside, depth = self.anat_P, self.anat_inside, self.anat_depth
        # which anatomy-grid points the scan sees (z range, field of view, circular mask)
        fov_ok = self._fov_mask(P)
        cand_all = np.argwhere(inside & fov_ok & (depth >= 3.0))
        if cand_all.size == 0:
            return []
        pts_all = np.stack([P.x[cand_all[:, 2]], P.y[cand_all[:, 1]], P.z[cand_all[:, 0]]], 1).astype(float)
        dep_all = depth[cand_all[:, 0], cand_all[:, 1], cand_all[:, 2]]
        segs = [s for s in self.segments if s[2] >= 1.5]
        specs = draw_tumour_specs(rng, count, dominant, pts_all, dep_all, segs, ANATOMY_STEP_MM, self.phase,
                                  float(self.levels[Tissue.LIVER]), self.contrast)
        return [render_tumour(g, self.hu, self.tissue, self.liver_sl, self.liver_mask, self.tumour_mask, i + 1, s)
                for i, s in enumerate(specs)]
