"""Radiomic feature extraction: the features of :mod:`.radiomics_catalogue` for one region of a CT.

*Discretisation.* One pyradiomics ``RadiomicsFeatureExtractor`` applies one discretisation to every
feature class, but the paper uses a bin width of 4 HU for the histogram and 128 grey levels for the
texture matrices. We therefore call pyradiomics' feature classes and its wavelet filter directly — the
calls the extractor makes internally — each with its own settings, and each with only the features that
are asked for (``only=``), so a filter that needs 20 features computes those and nothing else.

Histogram descriptors, gradient statistics and moment invariants that pyradiomics lacks are computed
here with numpy and scipy (see the catalogue's notes for their definitions).

Everything is computed on the region's bounding box plus a margin of ``MARGIN_VOXELS`` on every side
(clipped at the volume's edges), never on the whole volume. Degenerate regions (a voxel or two) may give
NaN for some texture features; the classifier replaces non-finite values with the training mean.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .masks import bounding_box, grow_box
from .radiomics_catalogue import (
    BIN_WIDTH,
    BOUNDARY_BAND_MM,
    FEATURE_NAMES,
    GRADIENT_SIGMA_VOXELS,
    HISTOGRAM_FEATURES,
    HISTOGRAM_MAX_BINS,
    HISTOGRAM_PERCENTILES,
    KNOWN_NAMES,
    MARGIN_VOXELS,
    PYRADIOMICS_GROUPS,
    TEXTURE_BIN_COUNT,
    WAVELET,
    import_pyradiomics,
)


def _plan(names) -> dict:
    """{image: {group: [feature, ...]}} for the requested names (shape under 'original')."""
    plan: dict[str, dict[str, list[str]]] = {}
    for name in names:
        if name not in KNOWN_NAMES:
            raise ValueError(f"unknown radiomic feature name {name!r}; see LiverTumorSegLib.radiomics_catalogue.FEATURE_NAMES")
        image, group, feature = name.split("_", 2)
        plan.setdefault(image, {}).setdefault(group, []).append(feature)
    return plan


def extract_features(
    image_hu: np.ndarray, mask: np.ndarray, spacing_xyz: tuple, *, only: list[str] | None = None
) -> dict[str, float]:
    """Radiomic features of one region: all 728 (``FEATURE_NAMES`` order) or only the names in ``only``.

    ``image_hu`` (z, y, x) in HU, ``mask`` (z, y, x) of one region (non-zero = inside), ``spacing_xyz`` in mm.
    Values are floats; a degenerate region (one or two voxels) may give NaN for some texture features.
    """
    names = list(FEATURE_NAMES) if only is None else list(dict.fromkeys(only))
    plan = _plan(names)
    mask = np.asarray(mask) != 0
    if image_hu.shape != mask.shape or image_hu.ndim != 3:
        raise ValueError(f"image {image_hu.shape} and mask {mask.shape} must be 3D arrays of the same shape")
    box = bounding_box(mask)
    if box is None:
        raise ValueError("the region is empty")
    crop = grow_box(box, MARGIN_VOXELS, mask.shape)
    image = np.asarray(image_hu[crop], dtype=np.float64)
    region = mask[crop]
    spacing = tuple(float(s) for s in spacing_xyz)
    values: dict[str, float] = {}
    if not plan:
        return values

    # A crop thinner than 4 voxels (a volume of very few slices) is padded, edges repeated, so that the
    # wavelet and Gaussian filters have room; the region itself is unchanged.
    pad = [(0, max(0, 4 - n)) for n in image.shape]
    if any(after for _, after in pad):
        image = np.pad(image, pad, mode="edge")
        region = np.pad(region, pad)

    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate regions give NaN, not warnings
        _extract(plan, image, region, spacing, values)
    return {name: float(values[name]) for name in names}


def _extract(plan: dict, image: np.ndarray, region: np.ndarray, spacing: tuple, values: dict) -> None:
    gradients: dict[str, np.ndarray] = {}  # the original and the boundary band share one gradient image
    for key, groups in plan.items():
        if key == "original":
            if "shape" in groups:
                values.update(_prefixed("original_shape", _shape(region, spacing, groups["shape"])))
            block_image, block_region = image, region
        elif key == "boundary":
            block_image, block_region = image, boundary_band_mm(region, spacing)
        else:
            continue  # wavelet sub-bands below, from one decomposition
        values.update(_block(key, block_image, block_region, spacing, groups, gradients, "original"))

    wavelet_keys = [key for key in plan if key.startswith("wavelet-")]
    if wavelet_keys:
        for band, band_image in wavelet_subbands(image, spacing, [key.split("-", 1)[1] for key in wavelet_keys]).items():
            key = f"wavelet-{band}"
            values.update(_block(key, band_image, region, spacing, plan[key], gradients, key))


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{name}": value for name, value in values.items()}


def _block(key: str, image: np.ndarray, region: np.ndarray, spacing: tuple, groups: dict,
           gradients: dict, source: str) -> dict:
    """The non-shape groups of one image within one region (``gradients`` caches |∇| per ``source`` image)."""
    out: dict[str, float] = {}
    if not region.any():
        return {f"{key}_{group}_{f}": math.nan for group, feats in groups.items() if group != "shape" for f in feats}
    tight = bounding_box(region)
    texture_groups = {g: groups[g] for g in PYRADIOMICS_GROUPS if g in groups}
    if texture_groups:
        out.update(_pyradiomics(key, image[tight], region[tight], spacing, texture_groups))
    if "histogram" in groups:
        out.update(_prefixed(f"{key}_histogram", histogram_features(image[region], groups["histogram"])))
    if "gradient" in groups:
        if source not in gradients:
            gradients[source] = gradient_magnitude(image, spacing)
        magnitude = gradients[source][region]
        stats = {"Mean": float(magnitude.mean()), "StandardDeviation": float(magnitude.std())}
        out.update({f"{key}_gradient_{f}": stats[f] for f in groups["gradient"]})
    if "moments" in groups:
        j = moment_invariants(image, region, spacing)
        out.update({f"{key}_moments_{f}": j[f] for f in groups["moments"]})
    return out


def _sitk_pair(image: np.ndarray, region: np.ndarray, spacing: tuple):
    import SimpleITK as sitk

    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float64))
    sitk_mask = sitk.GetImageFromArray(np.ascontiguousarray(region, dtype=np.uint8))
    sitk_image.SetSpacing(spacing)
    sitk_mask.SetSpacing(spacing)
    return sitk_image, sitk_mask


_GLCM_CLASS = None


def glcm_class():
    """pyradiomics' GLCM feature class with its coefficient step vectorised (same values, ~3× faster).

    pyradiomics builds the sum and difference distributions p_{x+y}, p_{x−y} with a Python loop over
    all 2·Ng − 1 sums, each a boolean-indexed pass over the Ng × Ng × 13 matrix; at 128 grey levels that
    loop is most of a GLCM's cost. Here the same sums are one ``bincount`` per direction. Everything
    else — the matrix (pyradiomics' C code) and every feature formula — is pyradiomics' own.
    """
    global _GLCM_CLASS
    if _GLCM_CLASS is not None:
        return _GLCM_CLASS
    radiomics = import_pyradiomics()

    class GLCM(radiomics.glcm.RadiomicsGLCM):
        def _calculateCoefficients(self):
            P = self.P_glcm
            Ng = self.coefficients["Ng"]
            levels = self.coefficients["grayLevels"]
            grey = levels.astype("float")
            i, j = np.meshgrid(grey, grey, indexing="ij", sparse=True)
            k_sum = np.arange(2, (Ng * 2) + 1, dtype="float")
            k_diff = np.arange(0, Ng, dtype="float")
            n_v, n, _, n_a = P.shape
            flat = P.reshape(n_v, n * n, n_a)
            levels = levels.astype(np.int64)
            sum_index = (levels[:, None] + levels[None, :] - 2).ravel()
            diff_index = np.abs(levels[:, None] - levels[None, :]).ravel()
            p_sum = np.zeros((n_v, len(k_sum), n_a))
            p_diff = np.zeros((n_v, len(k_diff), n_a))
            for v in range(n_v):
                for a in range(n_a):
                    p_sum[v, :, a] = np.bincount(sum_index, weights=flat[v, :, a], minlength=len(k_sum))
                    p_diff[v, :, a] = np.bincount(diff_index, weights=flat[v, :, a], minlength=len(k_diff))
            eps = np.spacing(1)
            self.coefficients.update(
                eps=eps, i=i, j=j, kValuesSum=k_sum, kValuesDiff=k_diff,
                px=P.sum(2, keepdims=True), py=P.sum(1, keepdims=True),
                ux=np.sum(i[None, :, :, None] * P, (1, 2), keepdims=True),
                uy=np.sum(j[None, :, :, None] * P, (1, 2), keepdims=True),
                pxAddy=p_sum, pxSuby=p_diff,
                HXY=(-1) * np.sum((P * np.log2(P + eps)), (1, 2)),
            )

    _GLCM_CLASS = GLCM
    return GLCM


def _pyradiomics(key: str, image: np.ndarray, region: np.ndarray, spacing: tuple, groups: dict) -> dict:
    radiomics = import_pyradiomics()
    classes = {
        "firstorder": (radiomics.firstorder.RadiomicsFirstOrder, {"binWidth": BIN_WIDTH, "voxelArrayShift": 0}),
        "glrlm": (radiomics.glrlm.RadiomicsGLRLM, {"binCount": TEXTURE_BIN_COUNT}),
        "glcm": (glcm_class(), {"binCount": TEXTURE_BIN_COUNT, "distances": [1], "symmetricalGLCM": True}),
    }
    sitk_image, sitk_mask = _sitk_pair(image, region, spacing)
    out = {}
    for group, features in groups.items():
        cls, settings = classes[group]
        try:
            calculator = cls(sitk_image, sitk_mask, label=1, **settings)
            for feature in features:
                calculator.enableFeatureByName(feature)
            result = calculator.execute()
        except Exception:  # a degenerate region (e.g. no neighbouring voxel pairs): no value
            result = {}
        for feature in features:
            value = result.get(feature, math.nan)
            out[f"{key}_{group}_{feature}"] = float(np.real(value)) if np.size(value) == 1 else math.nan
    return out


def _shape(region: np.ndarray, spacing: tuple, features: list[str]) -> dict:
    radiomics = import_pyradiomics()
    tight = bounding_box(region)
    sitk_image, sitk_mask = _sitk_pair(region[tight].astype(np.float64), region[tight], spacing)
    calculator = radiomics.shape.RadiomicsShape(sitk_image, sitk_mask, label=1)
    for feature in features:
        calculator.enableFeatureByName(feature)
    result = calculator.execute()
    return {feature: float(np.real(result[feature])) for feature in features}  # sqrt of a ~0 eigenvalue may be complex


def histogram_features(values: np.ndarray, features=HISTOGRAM_FEATURES) -> dict:
    """Histogram descriptors pyradiomics' first-order class does not provide (see the module notes).

    Written here because pyradiomics has no percentiles other than 10/90, no median absolute deviation,
    no quartile skewness and none of IBSI's intensity-histogram mode/gradient features.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    out: dict[str, float] = {}
    percentiles = np.percentile(values, (*HISTOGRAM_PERCENTILES, 50))
    for p, v in zip(HISTOGRAM_PERCENTILES, percentiles):
        out[f"Percentile{p:02d}"] = float(v)
    p25, p75, median = percentiles[2], percentiles[3], percentiles[-1]
    out["MedianAbsoluteDeviation"] = float(np.median(np.abs(values - median)))
    out["QuartileSkewness"] = float((p75 + p25 - 2 * median) / (p75 - p25)) if p75 > p25 else 0.0
    sd = values.std()
    out["OutlierFraction"] = float(np.mean(np.abs(values - values.mean()) > 2 * sd)) if sd > 0 else 0.0
    # Bins as pyradiomics anchors them for a fixed bin width: edges at multiples of the width.
    low = math.floor(values.min() / BIN_WIDTH) * BIN_WIDTH
    index = np.minimum(np.floor((values - low) / BIN_WIDTH).astype(np.int64), HISTOGRAM_MAX_BINS - 1)
    counts = np.bincount(index, minlength=1).astype(np.float64)
    probability = counts / counts.sum()
    centres = low + (np.arange(len(counts)) + 0.5) * BIN_WIDTH
    mode = int(np.argmax(probability))
    out["Mode"] = float(centres[mode])
    out["ModeProbability"] = float(probability[mode])
    out["OccupiedBins"] = float(np.count_nonzero(counts))
    # IBSI histogram gradient (central differences; of probabilities, so independent of region size).
    slope = np.gradient(probability) if len(probability) > 1 else np.zeros(1)
    high, fall = int(np.argmax(slope)), int(np.argmin(slope))
    out["MaximumGradient"] = float(slope[high])
    out["MaximumGradientIntensity"] = float(centres[high])
    out["MinimumGradient"] = float(slope[fall])
    out["MinimumGradientIntensity"] = float(centres[fall])
    return {name: out[name] for name in features}


def gradient_magnitude(image: np.ndarray, spacing_xyz: tuple, sigma_voxels: float = GRADIENT_SIGMA_VOXELS) -> np.ndarray:
    """|∇(G_σ * I)| in intensity/mm, σ = ``sigma_voxels`` × spacing along each axis.

    Separable Gaussian derivative filters (scipy, truncated at 4σ, edges replicated). For isotropic voxels
    this equals SimpleITK's GradientMagnitudeRecursiveGaussian with σ = 1.5 × spacing to within the
    recursive filter's approximation; scipy's form runs about four times faster on the small crops here.
    """
    image = np.asarray(image, dtype=np.float64)
    spacing_zyx = tuple(float(s) for s in spacing_xyz)[::-1]

    def g(array, axis, order):
        return ndimage.gaussian_filter1d(array, sigma_voxels, axis=axis, order=order, mode="nearest", truncate=4.0)

    smooth_x = g(image, 2, 0)
    smooth_xy = g(smooth_x, 1, 0)
    dz = g(smooth_xy, 0, 1) / spacing_zyx[0]
    dy = g(g(smooth_x, 1, 1), 0, 0) / spacing_zyx[1]
    dx = g(g(g(image, 2, 1), 1, 0), 0, 0) / spacing_zyx[2]
    return np.sqrt(dz * dz + dy * dy + dx * dx)


def moment_invariants(image: np.ndarray, region: np.ndarray, spacing_xyz: tuple) -> dict:
    """J1, J2, J3 of the intensity-weighted second-order central moments of the region (see module notes).

    pyradiomics computes the binary region's covariance only (for its axis lengths); the paper's
    invariants weight voxels by intensity, so they are computed here.
    """
    coords = np.argwhere(region).astype(np.float64) * np.asarray(spacing_xyz, dtype=np.float64)[::-1]  # (z, y, x) mm
    values = np.asarray(image, dtype=np.float64)[region]
    weights = values - values.min()
    if not weights.sum() > 0:
        weights = np.ones_like(values)
    weights = weights / weights.sum()
    centre = weights @ coords
    d = coords - centre
    m = (d * weights[:, None]).T @ d  # 3 × 3 central moment matrix (normalised by the total weight)
    j1 = float(np.trace(m))
    j2 = float(m[0, 0] * m[1, 1] + m[0, 0] * m[2, 2] + m[1, 1] * m[2, 2] - m[0, 1] ** 2 - m[0, 2] ** 2 - m[1, 2] ** 2)
    j3 = float(np.linalg.det(m))
    return {"J1": j1, "J2": j2, "J3": j3}


def boundary_band_mm(region: np.ndarray, spacing_xyz: tuple, width_mm: float = BOUNDARY_BAND_MM) -> np.ndarray:
    """Voxels within ``width_mm`` millimetres of the region's border on either side (|signed distance| ≤ width)."""
    sampling = tuple(float(s) for s in spacing_xyz)[::-1]
    inside = ndimage.distance_transform_edt(region, sampling=sampling)  # to the nearest outside voxel
    outside = ndimage.distance_transform_edt(~region, sampling=sampling)  # to the nearest region voxel
    return (region & (inside <= width_mm)) | (~region & (outside <= width_mm))


def wavelet_subbands(image: np.ndarray, spacing_xyz: tuple, bands) -> dict[str, np.ndarray]:
    """The requested one-level stationary wavelet sub-bands (pyradiomics' Wavelet image type)."""
    import SimpleITK as sitk

    radiomics = import_pyradiomics()
    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float64))
    sitk_image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    wanted = set(bands)
    out = {}
    for band_image, name, _ in radiomics.imageoperations.getWaveletImage(sitk_image, None, wavelet=WAVELET, level=1):
        band = name.split("-", 1)[1]
        if band in wanted:
            out[band] = sitk.GetArrayFromImage(band_image).astype(np.float64, copy=False)
    return {band: out[band] for band in bands}
