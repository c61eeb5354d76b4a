"""Painting a procedural case, part 1: the table, the body wall layers, the thorax (lung bases, heart,
mediastinum, pulmonary vessels), the spine and the ribs. Tissue classes are written into ``self.tissue``
on the image grid; shapes come from the case's :class:`.anatomy.Anatomy`."""

from __future__ import annotations

import numpy as np

from .fields import RandomField, ellipsoid_distance, local_coordinates, tube_distance
from .grid import for_each_slice, paint, sample_box
from .tissues import Tissue


class TorsoPainting:
    """Table, body wall, thorax, spine and ribs of a procedural case (mixed into :class:`.case.Case`)."""

    def _paint_fn(self, lo, hi, fn, step_xy=2.0, step_z=2.5, categorical=()):
        sl = self.grid.box(lo, hi)
        if sl is None:
            return None, None
        return sl, sample_box(self.grid, sl, fn, step_xy, step_z, categorical)

    def _paint_table(self):
        a, g = self.anat, self.grid
        X, Y = g.px[None, :], g.py[:, None]
        top = a.table_top(X) + 1.0
        inside = (np.abs(X) < 230) & (Y >= top) & (Y < top + a.tab_thick)
        t = max(2.0, 1.05 * g.spacing[1])
        shell = inside & ((Y < top + t) | (Y >= top + a.tab_thick - t))
        self.tissue[:, shell] = Tissue.TABLE

    def _paint_body(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        sl = (slice(0, g.shape[0]), slice(0, g.shape[1]), slice(0, g.shape[2]))
        lo = (-a.a0 * 1.3, -a.b_ant * 1.4, -a.H - 450.0)
        hi = (a.a0 * 1.3, a.b_post * 1.3, 250.0)
        tex = RandomField(self.rng_shape, lo, hi, 10.0)

        def body(P):
            return a.body_fields(P) + (tex(P),)

        self.cav_depth = np.empty(g.shape, np.int8)  # depth inside the abdominal cavity (mm, clipped)
        self.body_texture = np.empty(g.shape, np.int8)  # unit-variance texture x 40, for fat and muscle
        t_skin = np.float32(a.t_skin)

        def layers(k, planes):
            f_out, f_fm, f_cav, t = planes
            view = tissue[k]
            np.copyto(view, np.uint8(Tissue.SKIN), where=f_out < 0)
            np.copyto(view, np.uint8(Tissue.FAT), where=f_out < -t_skin)
            np.copyto(view, np.uint8(Tissue.MUSCLE), where=f_fm < 0)
            np.copyto(view, np.uint8(Tissue.FAT), where=f_cav < 0)
            np.negative(f_cav, out=f_cav)
            np.clip(f_cav, -127, 127, out=f_cav)
            self.cav_depth[k] = f_cav
            t *= 40.0
            np.clip(t, -127, 127, out=t)
            self.body_texture[k] = t

        for_each_slice(g, sl, body, 4.0, 6.0, layers)

    def _paint_thorax(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        zmax = float(g.pz[-1])
        if zmax < a.dome_min - 5:
            return
        lo = (-a.A_R - 20, a.y_front - 30, a.dome_min - 5)
        hi = (a.A_L + 20, a.y_back + 40, zmax + 1)
        sl = g.box(lo, hi)
        if sl is None:
            return
        thor = sample_box(g, sl, a.thorax, 2.0, 2.5)
        cav = self.cav_depth[sl] > 0
        view = tissue[sl]
        lung = cav & (thor < 0)
        view[lung] = Tissue.LUNG
        view[cav & (thor >= 0) & (thor < a.t_d)] = Tissue.MUSCLE
        self.thorax_sl, self.thorax_f = sl, thor
        # heart with pericardial fat
        h = a.heart
        hx, hy = h["c"]
        hz = float(a.dome(np.float32(hx), np.float32(hy))) + 0.75 * h["r"][2]
        centre = (hx, hy, hz)

        def heart(P):
            dx, dy, dz = local_coordinates(P.X, P.Y, P.Z, centre, h["rot"])
            return ellipsoid_distance(dx, dy, dz, *h["r"])

        lo_h = (hx - 90, hy - 80, hz - 90)
        hi_h = (hx + 90, hy + 80, hz + 90)
        shl, fh = self._paint_fn(lo_h, hi_h, heart)
        if shl is not None:
            # layers follow the heart clipped by the diaphragm: the inferior wall lies on the diaphragm
            fc = np.maximum(fh, self._thorax_at(shl) + 1.0)
            paint(tissue, shl, fc < h["peri"], Tissue.FAT, over=(Tissue.LUNG,))
            paint(tissue, shl, fc < 0, Tissue.MYOCARDIUM, over=(Tissue.LUNG, Tissue.FAT))
            paint(tissue, shl, fc < -h["myo"], Tissue.HEART)
        # mediastinal fat around oesophagus and aorta, then the oesophagus
        zc = np.float32(a.hL)
        yv = float(a.y_vb(zc))
        vx, vy = a.vert_radii(float(zc))
        med_c = (float(a.x_spine(zc)) + 5, yv - vy - 10)

        def mediast(P):
            return np.sqrt(((P.X - med_c[0]) / 1.3) ** 2 + (P.Y - med_c[1]) ** 2) - 22.0 + 0 * P.Z

        shm, fm = self._paint_fn((med_c[0] - 45, med_c[1] - 40, a.hL - 150), (med_c[0] + 45, med_c[1] + 40, zmax + 1), mediast)
        if shm is not None:
            above = self._thorax_at(shm) < 0
            paint(tissue, shm, above & (fm < 0), Tissue.FAT, over=(Tissue.LUNG,))
        self._lung_vessels()

    def _thorax_at(self, sl):
        """Thorax function on the sub-box ``sl`` of the image (evaluated on demand)."""
        return sample_box(self.grid, sl, self.anat.thorax, 2.0, 2.5)

    def _paint_tube(self, pts, radii, tid, over=None, shell=None, inner_tid=None, k=0.0):
        """Hard-paint a tube (chain of capsules); optional inner lumen ``shell`` mm inside with ``inner_tid``."""
        pts = [tuple(map(float, p)) for p in pts]
        arr = np.array(pts)
        rmax = max(radii)
        lo = arr.min(0) - rmax - 2
        hi = arr.max(0) + rmax + 2
        sl = self.grid.box(lo, hi)
        if sl is None:
            return None, None
        P = self.grid.points(sl)
        f = tube_distance(P, pts, radii, k)
        paint(self.tissue, sl, f < 0, tid, over)
        if shell is not None and inner_tid is not None:
            paint(self.tissue, sl, f < -shell, inner_tid, over=(tid,))
        return sl, f

    def _paint_spine(self):
        """Vertebrae slice by slice: body (cortical shell, marrow, endplates), discs, neural arch around the
        canal, spinous and transverse processes (thoracic spinous processes slope down to the next level)."""
        a, g, tissue = self.anat, self.grid, self.tissue
        rcx, rcy = a.r_canal
        xs, ys = g.px, g.py

        def seg2(X, Y, p, q, r0, r1):
            ab = (q[0] - p[0], q[1] - p[1])
            l2 = ab[0] ** 2 + ab[1] ** 2
            t = np.clip(((X - p[0]) * ab[0] + (Y - p[1]) * ab[1]) / l2, 0, 1)
            return np.sqrt((X - p[0] - t * ab[0]) ** 2 + (Y - p[1] - t * ab[1]) ** 2) - (r0 + (r1 - r0) * t)

        for k, z in enumerate(g.pz):
            z = float(z)
            v = next((v for v in a.verts if v["bot"] <= z <= v["top"]), None)
            if v is None:  # disc level: dimensions of the vertebra above
                v = next((v for v in reversed(a.verts) if v["bot"] > z), None)
                if v is None or v["bot"] - z > 12:
                    continue
            xc = float(a.x_spine(np.float32(z)))
            yl = float(a.y_lamina(np.float32(z)))
            yc = yl - 5.0 - rcy
            rx, ry = v["rx"], v["ry"]
            yb = yc - rcy - 3.0 - ry
            span = rx + (45 if v["lumbar"] else 32)
            x0, x1 = np.searchsorted(xs, xc - span), np.searchsorted(xs, xc + span)
            y0, y1 = np.searchsorted(ys, yb - ry - 6), np.searchsorted(ys, yl + a.spinous_len + 6)
            if x1 <= x0 or y1 <= y0:
                continue
            X = xs[None, x0:x1] - xc
            Y = ys[y0:y1, None]
            view = tissue[k, y0:y1, x0:x1]
            in_body = v["bot"] <= z <= v["top"]
            rho = np.sqrt((X / rx) ** 2 + ((Y - yb) / ry) ** 2)
            d_body = (rho - 1.0) * min(rx, ry)
            canal = np.sqrt((X / rcx) ** 2 + ((Y - yc) / rcy) ** 2) < 1.0
            if in_body:
                endplate = min(z - v["bot"], v["top"] - z) < 1.2
                view[d_body < 0] = Tissue.CORTICAL
                if not endplate:
                    view[d_body < -1.3] = Tissue.MARROW
                rel = (z - v["bot"]) / (v["top"] - v["bot"])
                parts = None
                if 0.1 < rel < 0.9:  # pedicles and laminae: a ring around the canal
                    ring = np.sqrt((X / (rcx + 5.5)) ** 2 + ((Y - yc) / (rcy + 5.0)) ** 2)
                    parts = np.where(Y > yb, (ring - 1.0) * 5.0, 10.0)
                srel = rel + (0.0 if v["lumbar"] else 0.45)
                if 0.2 < srel < 1.05:
                    tip = yl + a.spinous_len * (0.75 if v["lumbar"] else 0.6)
                    sp = seg2(X, Y, (0.0, yc + rcy), (0.0, tip), 3.2 if v["lumbar"] else 2.6, 4.5 if v["lumbar"] else 3.0)
                    parts = sp if parts is None else np.minimum(parts, sp)
                if 0.3 < rel < 0.8:
                    tl = (rx + 10) if v["lumbar"] else (rx - 6)
                    back = 0.2 if v["lumbar"] else 0.6
                    for side in (-1, 1):
                        p0 = (side * (rcx + 3.0), yc)
                        p1 = (side * (rcx + tl), yc + back * tl)
                        tp = seg2(X, Y, p0, p1, 4.0, 2.5 if v["lumbar"] else 3.5)
                        parts = tp if parts is None else np.minimum(parts, tp)
                if parts is not None:
                    sel = (parts < 0) & ~canal
                    view[sel & (d_body >= -1.3)] = Tissue.CORTICAL
                    view[sel & (parts < -1.3) & (d_body >= -1.3)] = Tissue.MARROW
            else:
                view[d_body < 0] = Tissue.DISC
            view[canal] = Tissue.CANAL

    def _rib_paths(self):
        a = self.anat
        ribs = []
        ext = {5: 2.8, 6: 2.75, 7: 2.65, 8: 2.55, 9: 2.45, 10: 2.3, 11: 1.6, 12: 0.95}
        cart = {5: 0.82, 6: 0.78, 7: 0.74, 8: 0.72, 9: 0.72, 10: 0.74, 11: 1.0, 12: 1.0}
        rng = np.random.default_rng(a.calc_seed)
        for v in a.verts:
            if not v["name"].startswith("T"):
                continue
            n = int(v["name"][1:])
            if n < 5:
                continue
            zc = v["bot"] + 0.6 * (v["top"] - v["bot"])
            drop = rng.uniform(55, 90) if n < 11 else rng.uniform(20, 40)
            rise = rng.uniform(15, 40) if 6 <= n <= 10 else 0.0
            r_rib = rng.uniform(3.2, 4.3)
            for side in (-1, 1):
                yv = float(a.y_vb(np.float32(zc)))
                xs = float(a.x_spine(np.float32(zc)))
                pts = [(xs + side * (v["rx"] + 2), yv + 0.5 * v["ry"], zc)]
                n_arc = 11
                sv = np.arange(n_arc + 1) / n_arc
                th = np.pi / 2 - side * (0.55 + sv * ext[n])
                sc = cart[n]
                zs = np.where(sv <= sc, zc - drop * (1 - np.cos(np.pi * np.minimum(sv, sc) / (2 * sc))),
                              zc - drop + rise * (sv - sc) / max(1 - sc, 1e-6))
                depth = lambda tm, r=r_rib: np.where(tm > 2 * r + 2, r + 0.8, tm / 2)  # noqa: E731
                pts += [tuple(p) for p in a.wall_point(th, zs, depth)]
                ribs.append(dict(pts=pts, r=r_rib, cart=cart[n], n=n))
        return ribs

    def _paint_ribs(self):
        a, g = self.anat, self.grid
        wall = (Tissue.MUSCLE, Tissue.FAT, Tissue.LUNG)
        for rib in self._rib_paths():
            pts = rib["pts"]
            n_bone = int(round(1 + (len(pts) - 2) * rib["cart"]))
            r = rib["r"]
            radii = [r * 0.9] + [r] * (len(pts) - 1)
            self._paint_tube(pts[: n_bone + 1], radii[: n_bone + 1], Tissue.CORTICAL, over=wall, shell=1.2, inner_tid=Tissue.MARROW)
            if n_bone + 1 < len(pts):
                self._paint_tube(pts[n_bone:], [r * 0.9] * (len(pts) - n_bone), Tissue.CARTILAGE, over=wall)
        # sternum / xiphoid (anterior midline, upper slices)
        z_x = a.verts[[v["name"] for v in a.verts].index("T10")]["top"] - 5
        top = float(g.pz[-1]) + 5
        if top > z_x - 40:
            pts, radii = [], []
            for z in np.arange(z_x - 45, max(top, z_x - 40) + 10, 10.0):
                p = a.wall_point(-np.pi / 2, float(z), 4.0)
                pts.append(p)
                radii.append(7.0 if z > z_x else 4.0)
            self._paint_tube(pts, radii, Tissue.CORTICAL, over=wall, shell=1.2, inner_tid=Tissue.MARROW)

    def _lung_vessels(self):
        a, g = self.anat, self.grid
        if getattr(self, "thorax_sl", None) is None:
            return
        sl = self.thorax_sl
        lo = (-a.a0 - 10, a.y_front - 20, a.hL - max(a.drop) - 40)
        hi = (a.a0 + 10, a.y_back + 40, 200.0)
        f1 = RandomField(self.rng_shape, lo, hi, 16.0)
        f2 = RandomField(self.rng_shape, lo, hi, 16.0)

        def net(Q):
            return np.maximum(np.abs(f1(Q)), np.abs(f2(Q)))

        f = sample_box(g, sl, net, 1.5, 2.0)
        paint(self.tissue, sl, f < 0.09, Tissue.PULM_VESSEL, over=(Tissue.LUNG,))
