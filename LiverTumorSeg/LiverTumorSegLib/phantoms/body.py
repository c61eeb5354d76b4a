"""The patient frame's body wall, diaphragm and spine: the outline of the trunk (habitus, subcutaneous fat,
muscle wall, the table it rests on), the diaphragm domes that separate thorax from abdomen, and the
vertebral column that the other organs are placed against. A part of :class:`.anatomy.Anatomy`."""

from __future__ import annotations

import numpy as np

from .fields import Points, smooth_max, wrap_angle


class BodyFrame:
    """Body wall, diaphragm and spine functions of one patient (mixed into :class:`.anatomy.Anatomy`, whose
    constructor draws the parameters they read). Coordinates as there: x to the patient's left, y posterior,
    z superior, millimetres."""

    def _wz(self, z):
        out = 1.0
        for amp, lam, ph in self.zwaves:
            out = out + amp * np.sin(2 * np.pi * z / lam + ph)
        return out

    def radius(self, th, z):
        """Body outline radius (mm) at polar angle ``th`` (0 = patient left, pi/2 = posterior) and height z."""
        c, s = np.cos(th), np.sin(th)
        w = self._wz(z)
        a = self.a0 * w
        bant = self.b_ant * w * (1 + self.belly * np.clip((-90.0 - z) / 150.0, 0, 1))
        b = np.where(s < 0, bant, self.b_post)
        n = self.n_se
        r = (np.abs(c / a) ** n + np.abs(s / b) ** n) ** (-1.0 / n)
        mod = 1.0
        for k, ck, ph in self.fourier:
            mod = mod + ck * np.cos(k * th + ph)
        mod = mod - self.groove * np.exp(-(wrap_angle(th - np.pi / 2) / 0.12) ** 2)
        return r * mod

    def t_sc(self, th, z):
        g = 0.0
        for k, dk, ph in self.sc_fourier:
            g = g + dk * np.cos(k * th + ph)
        amp, lam, ph = self.sc_wave
        t = self.t_sc0 * np.exp(g) * (1 - 0.45 * np.exp(-(wrap_angle(th - np.pi / 2) / 0.3) ** 2))
        t = t * (1 + amp * np.sin(2 * np.pi * z / lam + ph))
        t = t + self.t_sc0 * 3 * self.belly * np.clip((-90.0 - z) / 150.0, 0, 1) * np.maximum(0, -np.sin(th))
        return np.clip(t, 2.5, 90.0)

    def t_m(self, th, z, R=None):
        """Muscle wall thickness (mm): thin lateral/anterior abdominal muscles with the linea alba, and a
        posterior wall (paraspinal muscles, quadratus lumborum) whose front runs just behind the transverse
        processes, so that kidneys and lung recesses sit in the paravertebral gutters."""
        dp = wrap_angle(th - np.pi / 2)
        la = np.exp(-(wrap_angle(th + np.pi / 2) / (self.w_la / 220.0)) ** 4)
        base = self.t_m0 * (1 - 0.85 * la) + self.ql * np.exp(-((np.abs(dp) - 1.15) / 0.22) ** 2)
        s = np.sin(th)
        if R is None:
            R = self.radius(th, z)
        R = np.minimum(R, self.y_tab / np.maximum(s, 0.05))
        lateral = np.clip((np.abs(np.cos(th)) / np.maximum(s, 0.05) * 60.0 - 25.0) / 30.0, 0, 1)
        deep = 18.0 * np.clip((z + 60.0) / 60.0, 0, 1) * lateral
        yw = self.y_canal(z) + 6.0 + deep
        t_post = R - self.t_skin - self.t_sc(th, z) - yw / np.maximum(s, 0.2)
        w = np.exp(-(dp / 0.8) ** 6)
        return np.maximum(base, w * t_post)

    def table_top(self, X):
        return self.y_tab - self.tab_curve * X * X

    def body_fields(self, P: Points):
        """(outer surface, fat/muscle interface, inner cavity) signed distances in mm (negative inside)."""
        X, Y, Z = P.X, P.Y, P.Z
        th = np.arctan2(Y, X)
        r = np.sqrt(X * X + Y * Y)
        R = self.radius(th, Z)
        dR = (self.radius(th + 0.01, Z) - self.radius(th - 0.01, Z)) / 0.02
        f_out = (r - R) * R / np.sqrt(R * R + dR * dR)
        f_out = np.maximum(f_out, Y - self.table_top(X) + 0 * Z)
        f_fm = f_out + self.t_skin + self.t_sc(th, Z)
        f_cav = f_fm + self.t_m(th, Z, R)
        return f_out.astype(np.float32), f_fm.astype(np.float32), f_cav.astype(np.float32)

    def cavity(self, P: Points):
        return self.body_fields(P)[2]

    def wall_point(self, th, z, depth=0.0):
        """Point(s) on the inner surface of the abdominal wall at angle ``th`` and height ``z``, moved
        ``depth`` mm outwards (scalars or arrays); returns (x, y, z) or an (n, 3) array."""
        th_a = np.atleast_1d(np.asarray(th, np.float32))
        z_a = np.atleast_1d(np.asarray(z, np.float32)) + 0 * th_a
        R = self.radius(th_a, z_a)
        sn = np.sin(th_a)
        R = np.where(sn > 0.2, np.minimum(R, self.y_tab / np.maximum(sn, 1e-3)), R)
        tm = self.t_m(th_a, z_a)
        d = np.asarray(depth(tm) if callable(depth) else depth, np.float32)
        rin = R - self.t_skin - self.t_sc(th_a, z_a) - tm + d
        out = np.stack([rin * np.cos(th_a), rin * sn, z_a], 1).astype(float)
        return out if np.ndim(th) else tuple(out[0])

    def _cavity_reference(self):
        z_ref = -0.45 * self.H
        xs = np.arange(-self.a0 * 1.2, self.a0 * 1.2, 2.0)
        ys = np.arange(-self.b_ant * 1.3, self.b_post * 1.3, 2.0)
        cav = self.cavity(Points([z_ref], ys, xs))[0] < 0
        cols = np.where(cav.any(axis=0))[0]
        self.A_R, self.A_L = float(-xs[cols[0]]), float(xs[cols[-1]])
        mid = cav[:, np.abs(xs) < 10].any(axis=1)
        self.y_front = float(ys[np.where(mid)[0][0]])
        back = []
        for xc in (-0.5 * self.A_R, 0.5 * self.A_L):
            col = cav[:, np.argmin(np.abs(xs - xc))]
            back.append(float(ys[np.where(col)[0][-1]]))
        self.y_back = float(np.mean(back))
        self.y_mid = 0.5 * (self.y_front + self.y_back)
        self.B = 0.5 * (self.y_back - self.y_front)

    # ------------------------------------------------------------------------------ diaphragm

    def dome(self, X, Y):
        """Height (mm) of the upper surface of the diaphragm above (x, y)."""
        u = np.where(X < 0, X / self.A_R, X / self.A_L)
        v = (Y - self.y_mid) / self.B
        d_ant, d_lat, d_post = self.drop
        drop = d_lat + np.clip(v, 0, None) * (d_post - d_lat) + np.clip(-v, 0, None) * (d_ant - d_lat)
        wx, wy = self.dome_w
        out = None
        for (uc, vc, h) in (self.dome_R, self.dome_L):
            rho2 = ((u - uc) / wx) ** 2 + ((v - vc) / wy) ** 2
            d = h - drop * rho2 ** (self.dome_p / 2)
            out = d if out is None else smooth_max(out, d, 12.0)
        return out

    def thorax(self, P: Points):
        """Signed distance-like function of the thoracic side of the diaphragm (negative above it)."""
        X, Y = P.X[0], P.Y[0]  # (1, nx), (ny, 1)
        zd = self.dome(X, Y)
        gx = (self.dome(X + 1.0, Y) - self.dome(X - 1.0, Y)) / 2.0
        gy = (self.dome(X, Y + 1.0) - self.dome(X, Y - 1.0)) / 2.0
        norm = np.sqrt(1 + gx * gx + gy * gy)
        return ((zd[None] - P.Z) / norm[None]).astype(np.float32)

    # ------------------------------------------------------------------------------ spine

    def _make_spine(self, rng):
        u = rng.uniform
        scale = (self.A_in / 125.0) ** 0.5 * u(0.92, 1.08)
        names = [f"T{k}" for k in range(4, 13)] + [f"L{k}" for k in range(1, 6)] + ["S1"]
        heights = {**{f"T{k}": 19 + 1.1 * (k - 4) for k in range(4, 13)},
                   "L1": 29, "L2": 30, "L3": 31, "L4": 31, "L5": 30, "S1": 40}
        discs = {n: (5.0 if n.startswith("T") else 9.0) for n in names}
        width = {**{f"T{k}": 15 + 0.7 * (k - 4) for k in range(4, 13)},
                 "L1": 22, "L2": 23, "L3": 24, "L4": 25, "L5": 25, "S1": 26}
        centre_t10 = u(-25, 15)
        verts = []
        # stack from T10 downwards and upwards
        idx10 = names.index("T10")
        z = centre_t10 + heights["T10"] * scale / 2
        tops = {}
        for n in names[idx10:]:
            tops[n] = z
            z = z - heights[n] * scale - discs[n] * scale
        z = centre_t10 + heights["T10"] * scale / 2
        for n in reversed(names[:idx10]):
            z = z + discs[n] * scale + heights[n] * scale
            tops[n] = z
        for n in names:
            h = heights[n] * scale
            rx = width[n] * scale
            verts.append(dict(name=n, top=tops[n], bot=tops[n] - h, rx=rx, ry=rx * u(0.72, 0.8),
                              lumbar=not n.startswith("T")))
        self.verts = verts
        self.r_canal = (u(8, 10), u(6.5, 8.0))
        self.spine_curve = (u(-1, 1) * 1e-4, u(-4, 4))  # lordosis curvature, lateral tilt mm/100mm
        self.spinous_len = self.d_ps - u(4, 12)

    def vert_radii(self, z):
        zs = np.array([0.5 * (v["top"] + v["bot"]) for v in self.verts])
        rx = np.interp(-z, -zs, [v["rx"] for v in self.verts])
        ry = np.interp(-z, -zs, [v["ry"] for v in self.verts])
        return float(rx), float(ry)

    def y_lamina(self, z):
        """y (mm) of the posterior surface of the neural arch at height z (follows the back)."""
        z = np.asarray(z, np.float32)
        th = np.full_like(z, np.pi / 2)
        R = np.minimum(self.radius(th, z), self.y_tab)
        return R - self.t_skin - self.t_sc(th, z) - self.d_ps + self.spine_curve[0] * (z + 150) ** 2

    def x_spine(self, z):
        return np.asarray(z, np.float32) * self.spine_curve[1] / 100.0

    def y_canal(self, z):
        return self.y_lamina(z) - 5.0 - self.r_canal[1]

    def y_vb(self, z):
        zs = np.atleast_1d(np.asarray(z, np.float32))
        ry = np.array([self.vert_radii(float(v))[1] for v in zs], np.float32)
        out = self.y_canal(zs) - self.r_canal[1] - 3.0 - ry
        return out.reshape(np.shape(z)) if np.ndim(z) else out[0]
