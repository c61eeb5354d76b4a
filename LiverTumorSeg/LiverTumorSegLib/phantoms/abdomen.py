"""Painting a procedural case, part 2: the retroperitoneum (psoas, aorta with its branches, IVC, renal
vessels), the gastrointestinal organs (spleen, stomach with an air-fluid level, oesophagus, duodenum,
pancreas with the portal confluence, colon, small-bowel loops and mesenteric vessels), the liver (with
ascites when present) and what carves it (gallbladder, kidneys, IVC)."""

from __future__ import annotations

import math

import numpy as np

from .fields import RandomField, catmull_rom, chain_distance, tube_distance
from .grid import paint
from .tissues import Tissue


class AbdomenPainting:
    """Retroperitoneum, gastrointestinal organs and liver of a procedural case (mixed into :class:`.case.Case`)."""

    def _paint_retroperitoneum(self):
        a, g = self.anat, self.grid
        z0, z1 = float(g.pz[0]), float(g.pz[-1])
        # psoas muscles
        for side in (-1, 1):
            pts, radii = [], []
            for z in np.arange(-0.55 * a.H, z0 - 60, -30.0):
                vx, vy = a.vert_radii(z)
                grow = np.clip((-0.55 * a.H - z) / 130.0, 0, 1)
                r = 5 + grow * 15 * (a.A_in / 125)
                yv = float(a.y_vb(np.float32(z)))
                pts.append((float(a.x_spine(np.float32(z))) + side * (vx + r * 0.8), yv + 0.2 * vy, float(z)))
                radii.append(r)
            if len(pts) > 1:
                self._paint_tube(pts, radii, Tissue.MUSCLE, over=(Tissue.FAT,))
        # aorta (calcified plaques in older patients) and IVC
        ao = a.aorta_path(z0, z1)
        self._paint_tube(ao, [a.r_ao] * len(ao), Tissue.AORTA, over=(Tissue.FAT, Tissue.LUNG, Tissue.MUSCLE))
        self.aorta_pts = ao
        if a.aorta_calc:
            rng = np.random.default_rng(a.calc_seed + 1)
            for _ in range(a.aorta_calc):
                i = int(rng.integers(0, len(ao) - 1))
                t = rng.uniform()
                p = np.array(ao[i]) * (1 - t) + np.array(ao[i + 1]) * t
                ang = rng.uniform(0, 2 * np.pi)
                c = p + np.array([math.cos(ang), math.sin(ang), 0.0]) * (a.r_ao - 0.5)
                r = rng.uniform(0.8, 2.0)
                self._paint_tube([c - [0, 0, r], c + [0, 0, r * 2]], [r, r], Tissue.CALCIFICATION,
                           over=(Tissue.AORTA, Tissue.FAT, Tissue.MUSCLE))
        # renal vessels to the kidneys
        for k in a.kidneys:
            c = np.array(k["c"])
            hilum = c + np.array([-k["side"] * 0.7 * k["r"][0], -0.2 * k["r"][1], 0.0])
            zk = c[2]
            ao_pt = np.array([a.ao_x, float(a.y_vb(np.float32(zk))) - a.vert_radii(zk)[1] - a.r_ao - 3, zk + 10])
            ivc_pt = np.array([a.ivc_x, float(a.y_vb(np.float32(zk))) - a.vert_radii(zk)[1] - a.r_ivc - 4, zk + 5])
            self._paint_tube([ao_pt, hilum + [0, 4, 0]], [2.8, 2.4], Tissue.AORTA, over=(Tissue.FAT,))
            if k["side"] > 0:  # left renal vein crosses in front of the aorta
                mid = np.array([a.ao_x, ao_pt[1] - a.r_ao - 5, zk + 8])
                self._paint_tube([hilum - [0, 3, 0], mid, ivc_pt], [4.5, 4.0, 4.5], Tissue.IVC, over=(Tissue.FAT, Tissue.AORTA))
            else:
                self._paint_tube([hilum - [0, 3, 0], ivc_pt], [4.5, 4.5], Tissue.IVC, over=(Tissue.FAT,))
        # SMA and coeliac trunk
        zp = a.z_panc
        yv = float(a.y_vb(np.float32(zp))) - a.vert_radii(zp)[1] - 2 * a.r_ao - 2
        self._paint_tube([(a.ao_x, yv + 3, zp + 5), (a.ao_x - 2, yv - 12, zp - 10), (a.ao_x - 6, yv - 25, zp - 90)],
                   [3.5, 3.3, 2.5], Tissue.AORTA, over=(Tissue.FAT,))
        self._paint_tube([(a.ao_x, yv + 3, zp + 30), (a.ao_x - 3, yv - 15, zp + 35)], [3.2, 3.0], Tissue.AORTA, over=(Tissue.FAT,))

    def _paint_gi(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        soft = (Tissue.FAT,)
        # spleen
        s = a.spleen
        rmax = max(s["r"]) + 10
        c = s["c"]
        shl, f = self._paint_fn((c[0] - rmax, c[1] - rmax, c[2] - rmax), (c[0] + rmax, c[1] + rmax, c[2] + rmax), a.spleen_f)
        if shl is not None:
            paint(tissue, shl, f < 0, Tissue.SPLEEN, over=soft)
            self.spleen_sl = shl
        # stomach: wall, then contents split by an air-fluid level (patient supine: gas anterior)
        st = a.stomach
        pts, radii = st["pts"], st["r"]
        arr = np.array(pts)
        lo = arr.min(0) - max(radii) - 5
        hi = arr.max(0) + max(radii) + 5

        def stomach(P):
            return tube_distance(P, pts, radii, k=15.0)

        shl, f = self._paint_fn(lo, hi, stomach)
        if shl is not None:
            P = g.points(shl)
            paint(tissue, shl, f < 0, Tissue.STOMACH_WALL, over=soft)
            lumen = f < -st["wall"]
            y_front = float((arr[:, 1] - np.array(radii)).min())
            y_back = float((arr[:, 1] + np.array(radii)).max())
            level = y_front + st["fill"] * (y_back - y_front)
            gas = lumen & (P.Y < level)
            content = {"fluid": Tissue.STOMACH_FLUID, "food": Tissue.STOMACH_FLUID, "oral": Tissue.ORAL}[st["content"]]
            paint(tissue, shl, lumen & ~gas, content, over=(Tissue.STOMACH_WALL,))
            paint(tissue, shl, gas, Tissue.GAS, over=(Tissue.STOMACH_WALL,))
            self.stomach_sl = shl
        # oesophagus through the hiatus into the cardia
        zmax = float(g.pz[-1])
        st, rf = np.array(a.stomach["pts"][0]), a.stomach["r"][0]
        zc = np.float32(a.hL)
        yv, vy = float(a.y_vb(zc)), a.vert_radii(float(zc))[1]
        hiatus = np.array([0.5 * st[0], 0.5 * (st[1] + yv - vy - 14), a.hL - 12])
        cardia = st + (hiatus - st) / (np.linalg.norm(hiatus - st) + 1e-6) * 0.8 * rf
        oes = [(float(a.x_spine(np.float32(z))) + 8, float(a.y_vb(np.float32(z))) - a.vert_radii(z)[1] - 12, z)
               for z in (zmax + 30.0, a.hL + 20.0)] + [tuple(hiatus), tuple(cardia)]
        self._paint_tube(oes, [8.0, 8.0, 8.0, 8.0], Tissue.MUSCLE, over=(Tissue.LUNG, Tissue.FAT, Tissue.MUSCLE))
        # duodenum
        d = a.duodenum
        self._paint_tube(d["pts"], [d["r"]] * len(d["pts"]), Tissue.BOWEL, over=soft, shell=2.5,
                   inner_tid=Tissue.ORAL if a.oral else Tissue.BOWEL)
        # pancreas, splenic vein, portal trunk, SMV
        pn = a.pancreas
        arr = np.array(pn["pts"])
        lo = arr.min(0) - 25
        hi = arr.max(0) + 25
        warp = [(2.5, [RandomField(self.rng_shape, lo, hi, 10.0) for _ in range(3)])]

        def pancreas(P):
            X, Y, Z = a._warped(P, warp)
            return chain_distance(X, Y, Z, pn["pts"], pn["r"], k=8.0)

        shl, f = self._paint_fn(lo, hi, pancreas, 1.5, 2.0)
        if shl is not None:
            paint(tissue, shl, f < 0, Tissue.PANCREAS, over=soft)
        for v in (a.splenic_vein, a.portal_trunk, a.smv):
            self._paint_tube(v["pts"], v["r"], Tissue.VESSEL, over=soft + (Tissue.PANCREAS,))
        # colon with haustra, stool and gas
        col = a.colon
        fine = catmull_rom(col["pts"], 5)
        arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))])
        cr = col["r"] * (1 + 0.12 * np.cos(2 * np.pi * arc / col["haustra"]))
        gas = np.interp(arc, np.linspace(0, arc[-1], len(col["gas_profile"])), col["gas_profile"])
        shifted = fine + np.stack([np.zeros_like(arc), 2 * cr * gas, np.zeros_like(arc)], 1)
        lo = fine.min(0) - col["r"] * 1.2 - 3
        hi = fine.max(0) + col["r"] * 1.2 + 3
        sfield = RandomField(self.rng_shape, lo, hi, 7.0)

        def colon(P):
            return tube_distance(P, fine, list(cr), k=6.0), tube_distance(P, shifted, list(cr), k=6.0), sfield(P)

        shl, res = self._paint_fn(lo, hi, colon)
        if shl is not None:
            f, fs, sf = res
            paint(tissue, shl, f < 0, Tissue.BOWEL, over=soft)
            lumen = (f < -col["wall"]) & (tissue[shl] == Tissue.BOWEL)
            paint(tissue, shl, lumen, Tissue.STOOL)
            # gas: bubbles in the stool and a gas cap in the non-dependent (anterior) lumen
            paint(tissue, shl, lumen & ((sf > 1.3) | (fs > -col["wall"])), Tissue.GAS, over=(Tissue.STOOL,))
            self.colon_sl, self.colon_field = shl, sf
        # small bowel loops: bands of a random field below the liver, in the visceral fat
        self._small_bowel()

    def _small_bowel(self):
        """Small-bowel loops (bands of a random field) with fluid, gas or oral contrast, and mesenteric
        vessels (a thin tube network) in the visceral fat below the liver."""
        a, tissue = self.anat, self.tissue
        lo = (-a.A_R, a.y_front, -a.H - 320.0)
        hi = (a.A_L, a.y_back - 10, a.bowel_top + 40)
        rng = self.rng_shape
        f1 = RandomField(rng, lo, hi, 38.0)
        f2 = RandomField(rng, lo, hi, 60.0)
        f3 = RandomField(rng, lo, hi, 45.0)
        v1 = RandomField(rng, lo, hi, 30.0)
        v2 = RandomField(rng, lo, hi, 30.0)
        top, oral = a.bowel_top, a.oral

        def loops(P):
            fade = np.clip((top + 40 - P.Z) / 50.0, 0, 1)
            band = np.abs(f1(P)) - 0.55 * fade
            net = np.maximum(np.abs(v1(P)), np.abs(v2(P)))
            content = np.where(f2(P) > 1.5, 1, 0).astype(np.uint8)  # 1: gas
            if oral:
                content[(f3(P) > 0.3) & (content == 0)] = 2  # 2: oral contrast
            return band, net, content

        shl, res = self._paint_fn(lo, hi, loops, 2.0, 3.0, categorical=(2,))
        if shl is None:
            return
        band, net, content = res
        cav = self.cav_depth[shl] > 3
        paint(tissue, shl, cav & (band < 0), Tissue.BOWEL, over=(Tissue.FAT,))
        lumen = cav & (band < -0.14) & (tissue[shl] == Tissue.BOWEL)
        paint(tissue, shl, lumen & (content == 2), Tissue.ORAL)
        paint(tissue, shl, lumen & (content == 1), Tissue.GAS)
        self.bowel_sl, self.bowel_lumen = shl, lumen & (content == 0)
        paint(tissue, shl, (net < 0.07) & (self.cav_depth[shl] > 2), Tissue.MES_VESSEL, over=(Tissue.FAT,))

    def _paint_liver(self):
        a, tissue = self.anat, self.tissue
        lo, hi = a.liver_box
        sl, f = self._paint_fn(lo, hi, a.liver, 2.0, 2.5)
        self.liver_sl = sl
        if sl is None:
            self.liver_f = None
            return
        over = (Tissue.FAT, Tissue.BOWEL, Tissue.STOOL, Tissue.GAS, Tissue.STOMACH_WALL, Tissue.STOMACH_FLUID, Tissue.ORAL,
                Tissue.SPLEEN, Tissue.VESSEL, Tissue.MES_VESSEL)
        if a.ascites:
            asc = (f >= 0) & (f < 14.0) & (self.cav_depth[sl] > 1) & (self._thorax_at(sl) > a.t_d)
            paint(tissue, sl, asc, Tissue.ASCITES, over=(Tissue.FAT, Tissue.MES_VESSEL))
        paint(tissue, sl, f < 0, Tissue.LIVER, over=over)
        self.liver_f = f

    def _paint_after_liver(self):
        a, g, tissue = self.anat, self.grid, self.tissue
        carve = (Tissue.FAT, Tissue.LIVER, Tissue.BOWEL, Tissue.STOOL, Tissue.MES_VESSEL, Tissue.ASCITES, Tissue.GAS)
        # gallbladder
        if a.gb is not None:
            gb = a.gb
            r = max(gb["r"]) + 5
            c = gb["c"]
            shl, f = self._paint_fn((c[0] - r, c[1] - r, c[2] - r), (c[0] + r, c[1] + r, c[2] + r), a.gallbladder, 1.5, 2.0)
            if shl is not None:
                paint(tissue, shl, f < 0, Tissue.GB_WALL, over=carve)
                paint(tissue, shl, f < -gb["wall"], Tissue.GALLBLADDER, over=(Tissue.GB_WALL,))
                self.gb_sl, self.gb_f = shl, f
        # kidneys: cortex, pyramids (medulla), sinus fat
        for k in a.kidneys:
            r = max(k["r"]) + 6
            c = k["c"]
            lo, hi = (c[0] - r, c[1] - r, c[2] - r), (c[0] + r, c[1] + r, c[2] + r)

            def kid(P, k=k):
                f, sinus, dx, dy, dz = a.kidney(P, k)
                ang = np.arctan2(dz / k["r"][2], dy / k["r"][1])
                pyr = np.cos(k["n_pyr"] * ang + k["pyr_phase"])
                return f, sinus, pyr

            shl, res = self._paint_fn(lo, hi, kid, 1.5, 2.0)
            if shl is None:
                continue
            f, sinus, pyr = res
            paint(tissue, shl, (f < 0) & (sinus > 0), Tissue.CORTEX, over=carve + (Tissue.MUSCLE,))
            med = (f < -k["t_cx"]) & (sinus > 2.5) & (pyr > -0.35)
            paint(tissue, shl, med, Tissue.MEDULLA, over=(Tissue.CORTEX,))
            paint(tissue, shl, (f < 0) & (sinus <= 0), Tissue.FAT, over=(Tissue.CORTEX, Tissue.LIVER))
        # IVC (carves the liver's bare area) and hepatic segment
        z0, z1 = float(g.pz[0]), float(g.pz[-1])
        ivc = a.ivc_path(z0, z1)
        self._paint_tube(ivc, [a.r_ivc] * len(ivc), Tissue.IVC, over=(Tissue.FAT, Tissue.LIVER, Tissue.MUSCLE, Tissue.LUNG, Tissue.MES_VESSEL))
        self.ivc_pts = ivc
