"""One synthetic patient's anatomy in a patient frame (mm): habitus, liver built from warped lobes, kidneys,
spleen, stomach, pancreas, gallbladder, bowel, great vessels and the portal system, drawn from the anatomy
random stream only (independent of the image grid). Signed-distance functions describe each organ."""

from __future__ import annotations

import math

import numpy as np

from .body import BodyFrame
from .fields import Points, RandomField, ellipsoid_distance, local_coordinates, rotation_matrix, smooth_max, smooth_min, tube_distance


class Anatomy(BodyFrame):
    """One patient's geometry in a patient frame (mm): x to the patient's left, y posterior, z superior.

    The body axis is at x = y = 0 and z = 0 is the top of the liver dome (under the right hemidiaphragm).
    Everything here is drawn from the anatomy random stream only, so it does not depend on the image grid.
    """

    def __init__(self, rng: np.random.Generator):
        u, nrm = rng.uniform, rng.normal
        self.rng = rng
        # ---------------------------------------------------------------- habitus and body wall
        self.n_se = u(2.0, 2.7)
        self.fourier = [(k, nrm(0, 0.012), u(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
        self.groove = u(0.01, 0.03)
        self.zwaves = [(nrm(0, 0.022), u(180, 420), u(0, 2 * np.pi)) for _ in range(2)]
        self.t_skin = u(1.5, 2.5)
        self.t_sc0 = float(np.clip(rng.lognormal(np.log(15.0), 0.5), 4.0, 45.0))
        self.belly = u(0.0, 0.10) * min(1.0, self.t_sc0 / 25.0)
        self.sc_fourier = [(k, nrm(0, 0.2), u(0, 2 * np.pi)) for k in (1, 2, 3)]
        self.sc_wave = (nrm(0, 0.12), u(150, 350), u(0, 2 * np.pi))
        self.t_m0 = u(8, 14) if u() > 0.15 else u(5, 8)
        self.d_ps = u(40, 60)
        self.ql = u(6, 18)
        self.w_la = u(3, 14)
        self.t_d = u(3.0, 5.0)  # diaphragm thickness
        # outline from the abdominal cavity size plus the wall layers (obese patients are larger)
        self.A_in = u(105, 145)
        wall = self.t_skin + self.t_sc0 + self.t_m0
        self.a0 = self.A_in + wall
        self.b_ant = self.A_in * u(0.62, 0.78) + wall
        self.b_post = self.A_in * u(0.52, 0.66) + self.t_skin + 0.6 * self.t_sc0 + self.d_ps * 0.75
        self.age_factor = u(0, 1)  # 0 young .. 1 old: bone density, calcifications
        # flags
        self.cirrhosis = u() < 0.07
        self.steatosis = u() < 0.08
        self.ascites = u() < (0.5 if self.cirrhosis else 0.04)
        self.H = u(140, 205) * (0.85 if self.cirrhosis else 1.0)
        # table (body is flattened on it)
        zz = np.linspace(-450, 150, 41).astype(np.float32)
        back = min(float(self.radius(np.float32(np.pi / 2 + d), zz).min()) for d in (-0.2, 0.0, 0.2))
        self.y_tab = back * u(0.95, 0.99)  # the back rests on (and is flattened by) the table
        self.tab_curve = u(0.0, 1.0 / 2500)
        self.tab_thick = u(10, 22)

        # ---------------------------------------------------------------- spine
        self._make_spine(rng)
        z_ref = -0.45 * self.H
        self.y_vb_ref = float(self.y_vb(np.float32(z_ref)))
        self.r_vby_ref = self.vert_radii(z_ref)[1]

        # ---------------------------------------------------------------- cavity reference profile
        self._cavity_reference()
        A_R, A_L, B, ym, yf, yb = self.A_R, self.A_L, self.B, self.y_mid, self.y_front, self.y_back
        H = self.H

        # ---------------------------------------------------------------- diaphragm domes
        self.dome_R = (u(-0.55, -0.35), u(-0.1, 0.15), self.t_d)  # (u, v, apex height)
        self.dome_L = (u(0.35, 0.55), u(-0.05, 0.2), self.t_d - u(8, 25))
        self.dome_w = (u(0.65, 0.85), u(0.8, 1.0))
        self.dome_p = u(1.9, 2.5)
        self.drop = (u(35, 60), u(60, 90), u(95, 135))  # anterior, lateral, posterior
        self.hL = self.dome_L[2]
        xs = np.arange(-A_R, A_L, 4.0, dtype=np.float32)[None, :]
        ys = np.arange(yf, yb + 40, 4.0, dtype=np.float32)[:, None]
        self.dome_min = float(self.dome(xs, ys).min())  # lowest point of the costophrenic recesses

        # ---------------------------------------------------------------- kidneys
        zkR = -u(95, 135)
        self.kidneys = []
        for side, zc in ((-1, zkR), (1, zkR + u(8, 25))):
            rx, ry, rz = u(24, 30), u(21, 27), u(48, 60)
            vx, vy = self.vert_radii(zc)
            c = (side * (vx + u(38, 52)), float(self.y_vb(np.float32(zc))) + u(0, 15), zc)
            rot = rotation_matrix(math.radians(u(10, 25)), side * math.radians(u(8, 18)),
                            -side * math.radians(u(20, 40)))
            self.kidneys.append(dict(side=side, c=c, r=(rx, ry, rz), rot=rot, t_cx=u(5, 8),
                                     n_pyr=int(rng.integers(4, 7)), pyr_phase=u(0, 2 * np.pi)))

        # ---------------------------------------------------------------- liver
        self._q = dict(sL=u(0.7, 1.3), ry=u(-0.05, 0.1), rx=u(0.58, 0.7), rz=u(0.56, 0.64), taper=u(0.35, 0.55),
                       shx=u(0.05, 0.2), shy=u(-0.2, 0.0), lx=u(0.0, 0.2), ly=u(0.3, 0.42), lz=u(0.24, 0.32),
                       lrx=u(0.45, 0.75), lry=u(0.32, 0.42), lrz=u(0.2, 0.26), cy=u(0.25, 0.4), crx=u(0.14, 0.2),
                       hil=(u(15, 22), u(12, 17), u(14, 20)), clx=u(-0.05, 0.15), clw=u(2, 5), cly=u(12, 30),
                       clz=u(0.2, 0.35))
        lo = (-A_R - 15, yf - 15, -1.4 * H - 40)
        hi = (A_L, yb + 15, 40)
        amp2, len2 = (u(3.5, 5.0), 12.0) if self.cirrhosis else (u(1.5, 3.5), 25.0)
        self.liver_warp = [(u(6, 12), [RandomField(rng, lo, hi, 70.0) for _ in range(3)]),
                           (amp2, [RandomField(rng, lo, hi, len2) for _ in range(3)])]
        target = float(np.clip(rng.lognormal(np.log(1500.0), 0.2), 950, 2400)) * (0.75 if self.cirrhosis else 1.0)
        scale = 1.0
        step = 6.0
        grid = Points(np.arange(-1.7 * H - 40, 40, step), np.arange(yf - 15, yb + 15, step), np.arange(-A_R - 15, A_L, step))
        cache: dict = {}
        for _ in range(4):
            self._build_liver(H * scale, scale)
            vol = float(np.count_nonzero(self.liver(grid, cache=cache) < 0)) * step ** 3 / 1000.0
            ratio = target / max(vol, 1.0)
            if abs(ratio - 1) < 0.04:
                break
            scale *= float(np.clip(ratio, 0.4, 2.5)) ** (1 / 3)
        self.liver_target_ml = target
        self.H = H = H * scale

        # ---------------------------------------------------------------- great vessels
        self.r_ao = u(9, 12.5) * (1 + 0.15 * self.age_factor)
        self.r_ivc = u(9, 12)
        self.ivc_x = -u(18, 28)
        self.ao_x = u(8, 18)
        self.ivc_shift = u(10, 25)
        self.aorta_calc = int(rng.integers(0, 8) * self.age_factor) if u() < 0.6 else 0
        self.calc_seed = int(rng.integers(1 << 30))

        # ---------------------------------------------------------------- pancreas and portal system
        zp = -u(0.66, 0.78) * H  # pancreatic head below the porta hepatis, medial to the right lobe
        self.z_panc = zp
        y_pan_max = self.y_vb_ref - self.r_vby_ref - 2 * self.r_ao - 8
        self.pancreas = dict(pts=[(-0.12 * A_R, min(ym + 0.1 * B, y_pan_max), zp - 40),
                                  (-0.22 * A_R, min(ym + 0.05 * B, y_pan_max), zp - 15),
                                  (-0.04 * A_R, min(ym - 0.15 * B, y_pan_max - 10), zp),
                                  (0.25 * A_L, min(ym + 0.0 * B, y_pan_max), zp + 10),
                                  (0.5 * A_L, ym + 0.35 * B, zp + 22)],
                             r=[u(10, 14), u(14, 19), u(9, 12), u(9, 12), u(7, 10)])
        # ---------------------------------------------------------------- gallbladder
        self.gb = None
        if u() < 0.88:
            contracted = u() < 0.1
            s = 0.55 if contracted else u(0.85, 1.15)
            self.gb = dict(c=(u(-0.38, -0.15) * A_R, yf + u(0.3, 0.55) * B, -u(0.62, 0.8) * H),
                           r=(u(13, 20) * s, u(13, 20) * s, u(30, 45) * s),
                           rot=rotation_matrix(-math.radians(u(25, 50)), 0.0, math.radians(u(-20, 20))),
                           wall=u(3, 5) if contracted else u(1.5, 2.5), sludge=u() < 0.06)

        # ---------------------------------------------------------------- spleen
        size = u(0.8, 1.2) * (1.5 if (self.cirrhosis or u() < 0.06) else 1.0)
        self.spleen = dict(c=(0.6 * A_L, ym + u(0.35, 0.5) * B, self.hL - u(50, 75)),
                           r=(u(25, 33) * size, u(45, 60) * size, u(45, 58) * size),
                           rot=rotation_matrix(0.0, 0.0, math.radians(u(30, 55))))

        # ---------------------------------------------------------------- stomach, duodenum
        dist = u(0.6, 1.2)
        rf = u(28, 40) * dist
        hL = self.hL
        self.stomach = dict(
            pts=[(0.33 * A_L, ym + 0.25 * B, hL - self.t_d - rf - 2),
                 (0.45 * A_L, ym - 0.15 * B, hL - 55),
                 (0.3 * A_L, yf + 0.55 * B, hL - 95),
                 (0.02 * A_L, yf + 0.45 * B, hL - 105),
                 (-0.18 * A_R, yf + 0.6 * B, hL - 100)],
            r=[rf, 0.95 * rf, 0.8 * rf, 0.55 * rf, max(0.35 * rf, 9.0)],
            wall=u(3, 6), fill=u(0.05, 0.75),
            content=rng.choice(["fluid", "food", "oral"], p=[0.6, 0.2, 0.2]))
        p = self.stomach["pts"][-1]
        self.duodenum = dict(pts=[p, (-0.32 * A_R, ym + 0.05 * B, p[2] - 15), (-0.36 * A_R, ym + 0.2 * B, p[2] - 75),
                                  (-0.05 * A_R, ym + 0.25 * B, p[2] - 95)], r=u(10, 14))

        conf = (-0.04 * A_R, min(ym - 0.05 * B, y_pan_max + 4), zp + 2)
        self.confluence = conf
        r_pv = u(5.5, 7.0)
        self.r_pv = r_pv
        self.portal_trunk = dict(pts=[conf, self.porta], r=[r_pv, r_pv * 0.95])
        self.splenic_vein = dict(pts=[(0.5 * A_L, ym + 0.42 * B, zp + 26), (0.25 * A_L, min(ym + 0.1 * B, y_pan_max + 6), zp + 12), conf],
                                 r=[u(3.5, 5), u(3.5, 5), u(4, 5.5)])
        self.smv = dict(pts=[conf, (0.0, conf[1] - 20, zp - 60), (0.02 * A_L, conf[1] - 30, zp - 140)], r=[u(4.5, 6), 4.5, 3.5])

        # ---------------------------------------------------------------- heart, oesophagus
        self.heart = dict(c=(u(10, 40), yf + u(50, 70)), r=(u(55, 70), u(42, 55), u(45, 60)),
                          rot=rotation_matrix(0.0, 0.0, -math.radians(u(25, 45))), peri=u(2, 6), myo=u(7, 11))

        # ---------------------------------------------------------------- colon, small bowel
        rc = u(16, 25)
        sp = self.spleen["c"]
        self.colon = dict(
            pts=[(-0.62 * A_R, ym + 0.05 * B, -H - 130),
                 (-0.66 * A_R, ym + 0.15 * B, -H - 40),
                 (-0.7 * A_R, ym + 0.1 * B, -0.95 * H),
                 (-0.5 * A_R, yf + 0.4 * B, -0.82 * H),
                 (-0.15 * A_R, yf + 0.3 * B, -0.9 * H - u(0, 40)),
                 (0.3 * A_L, yf + 0.3 * B, -0.85 * H - u(0, 40)),
                 (0.66 * A_L, ym - 0.1 * B, sp[2] - self.spleen["r"][2] - 10),
                 (0.74 * A_L, ym + 0.2 * B, -0.95 * H),
                 (0.7 * A_L, ym + 0.15 * B, -H - 60),
                 (0.55 * A_L, ym + 0.0 * B, -H - 140)],
            r=rc, haustra=u(22, 38), wall=u(1.8, 3.0), gas_profile=np.clip(rng.normal(u(0.1, 0.5), 0.3, 6), 0, 1))
        self.bowel_top = -u(0.7, 0.85) * H
        self.oral = self.stomach["content"] == "oral" or u() < 0.2

    def _build_liver(self, H: float, s: float) -> None:
        """Liver lobes for a cranio-caudal extent ``H`` and in-plane scale ``s`` (from the drawn shape factors)."""
        q, A_R, A_L, B, yf, ym, yb = self._q, self.A_R, self.A_L, self.B, self.y_front, self.y_mid, self.y_back
        rx = q["rx"] * A_R * s
        self.liver_R = dict(c=(-1.12 * A_R + rx, ym + q["ry"] * B, -0.42 * H), r=(rx, 1.1 * B * min(s, 1.0), q["rz"] * H),
                            taper=q["taper"], shx=q["shx"] * A_R, shy=q["shy"] * B)
        self.liver_L = dict(c=(q["lx"] * A_L, yf + q["ly"] * B * s, -q["lz"] * H),
                            r=(q["lrx"] * A_L * q["sL"] * s, q["lry"] * B * s, q["lrz"] * H))
        self.liver_C = dict(c=(-0.12 * A_R, ym + q["cy"] * B, -0.4 * H),
                            r=(q["crx"] * A_R * s * (1.5 if self.cirrhosis else 1.0), 0.2 * B * s, 0.2 * H))
        if self.cirrhosis:
            self.liver_R["r"] = (self.liver_R["r"][0] * 0.85, self.liver_R["r"][1], self.liver_R["r"][2])
        self.hilum = dict(c=(-0.14 * A_R, ym + 0.05 * B, -0.6 * H), r=q["hil"])
        self.porta = (-0.14 * A_R, ym + 0.02 * B, -0.56 * H)
        self.cleft = dict(x=q["clx"] * A_L, w=q["clw"], y=yf + q["cly"], z=-q["clz"] * H)
        lo = (-A_R - 15, yf - 15, -1.3 * H - 30)
        hi = (self.liver_L["c"][0] + self.liver_L["r"][0] + 25, yb + 15, 40)
        self.liver_box = (lo, hi)

    def liver_volume_ml(self, step: float = 5.0) -> float:
        lo, hi = self.liver_box
        P = Points(np.arange(lo[2], hi[2], step), np.arange(lo[1], hi[1], step), np.arange(lo[0], hi[0], step))
        return float(np.count_nonzero(self.liver(P) < 0)) * step ** 3 / 1000.0

    # ------------------------------------------------------------------------------ organs

    def _warped(self, P: Points, warp):
        X, Y, Z = P.X, P.Y, P.Z
        dx = dy = dz = 0.0
        for amp, (fx, fy, fz) in warp:
            dx = dx + amp * fx(P)
            dy = dy + amp * fy(P)
            dz = dz + amp * fz(P)
        return X + dx, Y + dy, Z + dz

    def liver(self, P: Points, constrained: bool = True, cache: dict | None = None):
        """Liver signed distance (mm). ``cache`` keeps the parts that do not depend on the lobe sizes
        (warped coordinates, constraints) between calls on the same points."""
        if cache is not None and "xyz" in cache:
            X, Y, Z = cache["xyz"]
        else:
            X, Y, Z = self._warped(P, self.liver_warp)
            if cache is not None:
                cache["xyz"] = (X, Y, Z)
        R_ = self.liver_R
        (cx, cy, cz), (rx, ry, rz) = R_["c"], R_["r"]
        s = np.clip((cz - Z) / rz, 0, 1)
        taper = 1 - R_["taper"] * s ** 1.5
        fR = ellipsoid_distance(X - (cx - R_["shx"] * s), Y - (cy + R_["shy"] * s), Z - cz, rx * taper, ry * taper, rz)
        L_ = self.liver_L
        (cx, cy, cz), (rx, ry, rz) = L_["c"], L_["r"]
        q = np.clip((X - cx) / rx, 0, 1)
        tl = 1 - 0.6 * q
        fL = ellipsoid_distance(X - cx, Y - cy, Z - cz, rx, ry * tl, rz * tl)
        C = self.liver_C
        fC = ellipsoid_distance(X - C["c"][0], Y - C["c"][1], Z - C["c"][2], *C["r"])
        f = smooth_min(fR, fL, 18.0)
        f = smooth_min(f, fC, 8.0)
        hl = self.hilum
        f = np.maximum(f, -ellipsoid_distance(X - hl["c"][0], Y - hl["c"][1], Z - hl["c"][2], *hl["r"]))
        cl = self.cleft
        cleft = np.maximum(np.maximum(np.abs(X - cl["x"]) - cl["w"] / 2, Y - cl["y"]), Z - cl["z"])
        f = np.maximum(f, -cleft)
        if constrained:
            if cache is not None and "cons" in cache:
                cav, thor, retro = cache["cons"]
            else:
                cav, thor, retro = self.cavity(P) + 0.5, self.t_d - self.thorax(P), -self.retro(P)
                if cache is not None:
                    cache["cons"] = (cav, thor, retro)
            f = smooth_max(f, cav, 6.0)
            f = smooth_max(f, thor, 4.0)
            f = smooth_max(f, retro, 10.0)
        return f.astype(np.float32)

    def retro(self, P: Points):
        """Region the liver does not enter: around and behind the spine (crura, aorta) and behind the kidneys."""
        vx = self.vert_radii(-0.3 * self.H)[0]
        xs = float(self.x_spine(np.float32(-0.3 * self.H)))
        out = np.sqrt((P.X - xs) ** 2 + np.maximum(self.y_vb_ref - 8.0 - P.Y, 0.0) ** 2) - (vx + 14.0) + 0 * P.Z
        for k in self.kidneys:
            c, (rx, ry, rz) = k["c"], k["r"]
            dy = np.minimum(P.Y - c[1], 0.0)
            out = np.minimum(out, ellipsoid_distance(P.X - c[0], dy, P.Z - c[2], rx + 4, ry + 4, rz + 4))
        pancreas = getattr(self, "pancreas", None)  # (defined after the liver's size is settled)
        if pancreas is not None:  # a smooth impression instead of the liver wrapping around it
            out = np.minimum(out, tube_distance(P, pancreas["pts"], [r + 5.0 for r in pancreas["r"]], k=8.0))
        return out

    def gallbladder(self, P: Points):
        g = self.gb
        dx, dy, dz = local_coordinates(P.X, P.Y, P.Z, g["c"], g["rot"])
        # pear shape: wider fundus (negative local z), narrow neck
        s = np.clip(dz / g["r"][2], -1, 1)
        w = 1.0 - 0.35 * np.clip(s, 0, 1)
        return ellipsoid_distance(dx, dy, dz, g["r"][0] * w, g["r"][1] * w, g["r"][2]).astype(np.float32)

    def kidney(self, P: Points, k: dict):
        dx, dy, dz = local_coordinates(P.X, P.Y, P.Z, k["c"], k["rot"])
        rx, ry, rz = k["r"]
        f = ellipsoid_distance(dx, dy, dz, rx, ry, rz)
        # renal sinus opening medially (local -x towards the spine for both sides after mirroring)
        m = -k["side"]
        sinus = ellipsoid_distance(dx - m * 0.72 * rx, dy + 0.1 * ry, dz, 0.5 * rx, 0.32 * ry, 0.5 * rz)
        return f.astype(np.float32), sinus.astype(np.float32), dx, dy, dz

    def spleen_f(self, P: Points):
        s = self.spleen
        dx, dy, dz = local_coordinates(P.X, P.Y, P.Z, s["c"], s["rot"])
        rx, ry, rz = s["r"]
        f = ellipsoid_distance(dx, dy, dz, rx, ry, rz)
        hollow = ellipsoid_distance(dx + 1.25 * rx, dy, dz, 1.1 * rx, 0.9 * ry, 0.9 * rz)
        f = np.maximum(f, -hollow)
        f = np.maximum(f, self.cavity(P) + 0.5)
        f = np.maximum(f, self.t_d - self.thorax(P))
        return f.astype(np.float32)

    def aorta_path(self, z0: float, z1: float):
        zs = np.arange(z1 + 40, z0 - 40, -30.0)
        pts = []
        for z in zs:
            vx, vy = self.vert_radii(z)
            yv = float(self.y_vb(np.float32(z)))
            thor = np.clip((z - self.hL) / 60.0, 0, 1)
            x = self.ao_x + float(self.x_spine(z)) + thor * (vx + 4 - self.ao_x)
            y = (yv - vy - self.r_ao - 3) * (1 - thor) + (yv - 0.2 * vy) * thor
            pts.append((x, y, float(z)))
        return pts

    def ivc_path(self, z0: float, z1: float):
        zs = np.arange(min(z1 + 40, 60), z0 - 40, -25.0)
        pts = []
        for z in zs:
            vx, vy = self.vert_radii(z)
            yv = float(self.y_vb(np.float32(z)))
            hep = np.clip((z + 0.4 * self.H) / (0.25 * self.H), 0, 1)
            x = self.ivc_x + float(self.x_spine(z)) - 4 * hep
            y = yv - vy - self.r_ivc - 4 - self.ivc_shift * hep
            pts.append((x, y, float(z)))
        return pts
