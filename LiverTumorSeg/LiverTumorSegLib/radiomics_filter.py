"""Radiomics false-positive filter (paper §3.3.2): candidate lesions → 728 radiomic features → random forest.

Every 26-connected component of the tumour label is a candidate lesion. For each one the classifier's
selected features (about 20 of the 728) are computed, the random forest (ONNX, exported by the training
package with skl2onnx) gives the probability that it is a true tumour, and candidates below ``τ_rf``
are relabelled liver.

Feature catalogue (``FEATURE_NAMES``, fixed order; the table is ``docs/radiomics_features.md``, written by
``scripts/make_feature_table.py``). Names follow pyradiomics: ``<image>_<group>_<feature>``.

    shape (original image only)                                   8
    per image × 10 images (original, boundary band, 8 wavelet sub-bands):
        firstorder  (pyradiomics, bin width 4)                   18
        histogram   (width-4, ≤ 200-bin histogram; by hand)       16
        gradient    (Gaussian derivatives, σ = 1.5 × spacing)      2
        glrlm       (pyradiomics, 128 grey levels)               11
        glcm        (pyradiomics, 128 grey levels)               22
        moments     (J1, J2, J3; by hand)                          3
                                                                 --
                                                                 72   × 10 = 720
    total                                                             8 + 720 = 728

The paper's group 7 ("the above features except shape, recomputed within a narrow band around the
boundary") and group 8 ("non-shape features recalculated for each sub-band") both include the moment
invariants of group 6, so every one of the ten images carries the same 72-feature block.

Choices, and why:

- *Discretisation.* One pyradiomics ``RadiomicsFeatureExtractor`` applies one discretisation to every
  feature class, but the paper uses a bin width of 4 HU for the histogram and 128 grey levels for the
  texture matrices. We therefore call pyradiomics' feature classes and its wavelet filter directly — the
  calls the extractor makes internally — each with its own settings, and each with only the features that
  are asked for (``only=``), so a filter that needs 20 features computes those and nothing else.
- *Shape* (8 of pyradiomics' 17): VoxelVolume, SurfaceArea, SurfaceVolumeRatio, Sphericity,
  Maximum3DDiameter, MajorAxisLength, Elongation, Flatness — the paper's "volume, surface area,
  sphericity and compactness" plus size and elongation. Left out: MeshVolume (≈ VoxelVolume),
  Compactness1, Compactness2 and SphericalDisproportion (monotone functions of Sphericity, deprecated in
  pyradiomics for that reason), Minor/LeastAxisLength (carried by Elongation and Flatness with
  MajorAxisLength) and the three 2D maximum diameters (views of Maximum3DDiameter).
- *Run length* (11 of pyradiomics' 16): the classical set — Galloway (1975): short/long run emphasis,
  grey-level and run-length non-uniformity, run percentage; Chu et al. (1990): low/high grey-level run
  emphasis; Dasarathy & Holder (1991): the four short/long × low/high grey-level emphases. Left out are
  the later additions (normalised non-uniformities, grey-level and run variance, run entropy).
- *GLCM* (22 of pyradiomics' 24 current features): all but SumAverage, which equals 2 × JointAverage
  for the symmetric GLCM pyradiomics builds (pyradiomics' own example settings disable it), and MCC,
  whose computation (a Python loop over the grey levels and 13 eigen-decompositions of 128 × 128
  matrices) costs more than all the other GLCM features together and which pyradiomics sets to an
  arbitrary 1 for flat regions. Matrices: distance 1, 13 directions, symmetric, features averaged over
  directions (pyradiomics defaults).
- *First order*: pyradiomics' 18 current first-order features (mean, variance, skewness, kurtosis,
  energy, entropy, percentiles, …) on HU, entropy and uniformity on the width-4 histogram. Its 19th,
  StandardDeviation, is deprecated there as the square root of Variance and is not used.
- *Histogram* descriptors pyradiomics' first-order class lacks (it has 10th/90th percentiles, IQR,
  mean/robust mean absolute deviation, and entropy/uniformity of the binned histogram): the 1st, 5th,
  25th, 75th, 95th and 99th percentiles, the median absolute deviation, Bowley's quartile skewness, the
  fraction of voxels more than 2 SD from the mean, and IBSI intensity-histogram features of the width-4
  histogram (mode, mode probability, occupied bins, largest rise and fall of the histogram and where
  they are). The paper's "200 bins of width 4" is the
  histogram's extent: bins are anchored like pyradiomics' (edges at multiples of 4 from the region's
  minimum) and values beyond the 200th bin fall into it.
- *Gradient*: mean and standard deviation of the gradient magnitude in the region, from first-order
  Gaussian derivatives with σ = 1.5 × voxel spacing along each axis, in HU/mm. For isotropic voxels this
  is SimpleITK's GradientMagnitudeRecursiveGaussian with σ = 1.5 × spacing (to within its recursive
  approximation); the per-axis form keeps "1.5 × spacing" meaningful on the anisotropic processing grid
  (1 mm in-plane, the scan's slice spacing), and scipy's separable filters are faster on small crops.
  pyradiomics' "Gradient" image type has no Gaussian scale and gives no gradient statistics.
- *Moment invariants* J1, J2, J3 (Sadjadi & Hall 1980): trace, sum of principal 2 × 2 minors and
  determinant of the second-order central moment matrix (mm², mm⁴, mm⁶) of the region's
  *intensity-weighted* voxel distribution in physical coordinates, with weights = intensity − the
  region's minimum (non-negative, also for signed wavelet coefficients; uniform weights for a flat
  region). pyradiomics only has the binary region's principal axes (its axis lengths), not
  intensity-weighted moments, so these are computed here with numpy. Invariant to translation and
  rotation of the region.
- *Boundary band*: voxels whose centre lies within 2 mm of a voxel on the other side of the region's
  border (Euclidean distance in mm, scipy), inside and outside, i.e. |signed distance| ≤ 2 mm.
- *Wavelet*: pyradiomics' one-level stationary 3D wavelet (coif1), 8 sub-bands of the image, same
  size as the image; the region is the candidate itself.

Everything is computed on the region's bounding box plus a margin of ``MARGIN_VOXELS`` on every side
(clipped at the volume's edges), never on the whole volume. Degenerate regions (a voxel or two) may give
NaN for some texture features; the classifier replaces non-finite values with the training mean.

Parallelism over candidates (``filter_lesions(threads=…)``): pyradiomics' C extensions and scipy's
filters hold the GIL, so threads overlap only the numpy parts, while worker processes scale with the
cores but cost a start-up (a fork server that imports pyradiomics once per host process). Measured with
``scripts/benchmark_radiomics.py`` (30 candidates of 3–40 mm, 20 features) on a shared 2-core machine:
one process 1.6–2.1 s per volume, two threads 1.5–1.7 s, two worker processes 3.1 s on first use and
1.0–2.3 s after. So "auto" uses threads for two workers (a single volume per run is the common case)
and processes from three on, and threads wherever this Python cannot start a plain Python worker
(inside the Slicer application, whose executable is Slicer itself).
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

import numpy as np
from scipy import ndimage

from .errors import BundleError, Cancelled, LiverTumorSegError

log = logging.getLogger("LiverTumorSeg")

STAGE = "radiomics filter"
COMPONENT = "lesion_classifier"

BIN_WIDTH = 4.0
HISTOGRAM_MAX_BINS = 200
TEXTURE_BIN_COUNT = 128
GRADIENT_SIGMA_VOXELS = 1.5
BOUNDARY_BAND_MM = 2.0
WAVELET = "coif1"
MARGIN_VOXELS = 6
CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected candidates

SHAPE_FEATURES = (
    "VoxelVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity",
    "Maximum3DDiameter", "MajorAxisLength", "Elongation", "Flatness",
)
FIRSTORDER_FEATURES = (
    "Energy", "TotalEnergy", "Entropy", "Minimum", "10Percentile", "90Percentile", "Maximum", "Mean", "Median",
    "InterquartileRange", "Range", "MeanAbsoluteDeviation", "RobustMeanAbsoluteDeviation", "RootMeanSquared",
    "Skewness", "Kurtosis", "Variance", "Uniformity",
)
HISTOGRAM_PERCENTILES = (1, 5, 25, 75, 95, 99)
HISTOGRAM_FEATURES = tuple(f"Percentile{p:02d}" for p in HISTOGRAM_PERCENTILES) + (
    "MedianAbsoluteDeviation", "QuartileSkewness", "OutlierFraction", "Mode", "ModeProbability", "OccupiedBins",
    "MaximumGradient", "MaximumGradientIntensity", "MinimumGradient", "MinimumGradientIntensity",
)
GRADIENT_FEATURES = ("Mean", "StandardDeviation")
GLRLM_FEATURES = (
    "ShortRunEmphasis", "LongRunEmphasis", "GrayLevelNonUniformity", "RunLengthNonUniformity", "RunPercentage",
    "LowGrayLevelRunEmphasis", "HighGrayLevelRunEmphasis",
    "ShortRunLowGrayLevelEmphasis", "ShortRunHighGrayLevelEmphasis",
    "LongRunLowGrayLevelEmphasis", "LongRunHighGrayLevelEmphasis",
)
GLCM_FEATURES = (
    "Autocorrelation", "JointAverage", "ClusterProminence", "ClusterShade", "ClusterTendency", "Contrast",
    "Correlation", "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance", "JointEnergy", "JointEntropy",
    "Imc1", "Imc2", "Idm", "Idmn", "Id", "Idn", "InverseVariance", "MaximumProbability", "SumEntropy", "SumSquares",
)
MOMENT_FEATURES = ("J1", "J2", "J3")

#: The per-image block, in order: (group, features).
BLOCK = (
    ("firstorder", FIRSTORDER_FEATURES),
    ("histogram", HISTOGRAM_FEATURES),
    ("gradient", GRADIENT_FEATURES),
    ("glrlm", GLRLM_FEATURES),
    ("glcm", GLCM_FEATURES),
    ("moments", MOMENT_FEATURES),
)
#: pyradiomics' names and order of the one-level wavelet sub-bands (first letter: x axis).
WAVELET_BANDS = ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL")
IMAGES = ("original", "boundary") + tuple(f"wavelet-{band}" for band in WAVELET_BANDS)
PYRADIOMICS_GROUPS = ("firstorder", "glrlm", "glcm")

FEATURE_NAMES: list[str] = [f"original_shape_{name}" for name in SHAPE_FEATURES] + [
    f"{image}_{group}_{name}" for image in IMAGES for group, names in BLOCK for name in names
]
assert len(FEATURE_NAMES) == 728 and len(set(FEATURE_NAMES)) == 728

Progress = Callable[[str, float], None]


def pyradiomics_version() -> str:
    """The installed pyradiomics version (recorded with a trained classifier; the major version must match)."""
    return str(getattr(_radiomics(), "__version__", "unknown"))


def _major(version: str) -> str:
    """'v3.1.4' → '3' (pyradiomics writes its version with a leading v)."""
    return version.strip().lstrip("vV").split(".")[0]


def feature_settings() -> dict:
    """The extraction settings; stored with a trained classifier and checked when it is loaded."""
    return {
        "catalogue": "livertumorseg-radiomics-728",
        "n_features": len(FEATURE_NAMES),
        "firstorder": {"binWidth": BIN_WIDTH, "voxelArrayShift": 0},
        "histogram": {"bin_width": BIN_WIDTH, "max_bins": HISTOGRAM_MAX_BINS, "percentiles": list(HISTOGRAM_PERCENTILES)},
        "gradient": {"sigma_voxels": GRADIENT_SIGMA_VOXELS, "truncate_sigmas": 4.0, "units": "HU/mm"},
        "texture": {"binCount": TEXTURE_BIN_COUNT, "distances": [1], "symmetricalGLCM": True, "directions": 13},
        "moments": {"weights": "intensity minus region minimum", "coordinates": "mm"},
        "boundary_band_mm": BOUNDARY_BAND_MM,
        "wavelet": {"wavelet": WAVELET, "level": 1, "transform": "stationary"},
        "margin_voxels": MARGIN_VOXELS,
        "connectivity": 26,
    }


# ------------------------------------------------------------------------------------------ extraction


def _plan(names) -> dict:
    """{image: {group: [feature, ...]}} for the requested names (shape under 'original')."""
    known = _known_names()
    plan: dict[str, dict[str, list[str]]] = {}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown radiomic feature name {name!r}; see LiverTumorSegLib.radiomics_filter.FEATURE_NAMES")
        image, group, feature = name.split("_", 2)
        plan.setdefault(image, {}).setdefault(group, []).append(feature)
    return plan


_KNOWN: frozenset | None = None


def _known_names() -> frozenset:
    global _KNOWN
    if _KNOWN is None:
        _KNOWN = frozenset(FEATURE_NAMES)
    return _KNOWN


def crop_box(mask_box: tuple[slice, ...], shape: tuple[int, ...], margin: int = MARGIN_VOXELS) -> tuple[slice, ...]:
    """The region's bounding box grown by ``margin`` voxels on every side, clipped to the volume."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(mask_box, shape))


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
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        raise ValueError("the region is empty")
    crop = crop_box(box[0], mask.shape)
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
            block_image, block_region = image, boundary_band(region, spacing)
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
    tight = ndimage.find_objects(region.astype(np.uint8))[0]
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


def _radiomics():
    try:
        import radiomics
        from radiomics import firstorder, glcm, glrlm, imageoperations, shape  # noqa: F401  (submodules)
    except ImportError as error:
        raise LiverTumorSegError(
            f"The radiomics filter needs pyradiomics, which cannot be imported here ({error}). Install it with "
            "'pip install pyradiomics-bhklab' (a dependency of the engine), or switch the radiomics filter off."
        ) from None

    logging.getLogger("radiomics").setLevel(logging.WARNING)  # pyradiomics logs every step at INFO
    return radiomics


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
    radiomics = _radiomics()

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
    radiomics = _radiomics()
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
    radiomics = _radiomics()
    tight = ndimage.find_objects(region.astype(np.uint8))[0]
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


def boundary_band(region: np.ndarray, spacing_xyz: tuple, width_mm: float = BOUNDARY_BAND_MM) -> np.ndarray:
    """Voxels within ``width_mm`` of the region's border on either side (|signed distance| ≤ width)."""
    sampling = tuple(float(s) for s in spacing_xyz)[::-1]
    inside = ndimage.distance_transform_edt(region, sampling=sampling)  # to the nearest outside voxel
    outside = ndimage.distance_transform_edt(~region, sampling=sampling)  # to the nearest region voxel
    return (region & (inside <= width_mm)) | (~region & (outside <= width_mm))


def wavelet_subbands(image: np.ndarray, spacing_xyz: tuple, bands) -> dict[str, np.ndarray]:
    """The requested one-level stationary wavelet sub-bands (pyradiomics' Wavelet image type)."""
    import SimpleITK as sitk

    radiomics = _radiomics()
    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float64))
    sitk_image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    wanted = set(bands)
    out = {}
    for band_image, name, _ in radiomics.imageoperations.getWaveletImage(sitk_image, None, wavelet=WAVELET, level=1):
        band = name.split("-", 1)[1]
        if band in wanted:
            out[band] = sitk.GetArrayFromImage(band_image).astype(np.float64, copy=False)
    return {band: out[band] for band in bands}


# ------------------------------------------------------------------------------------------ classifier


class LesionClassifier:
    """The trained random forest (ONNX) with its selected features, standardisation and threshold τ_rf."""

    def __init__(self, session, meta: dict):
        self.session = session
        self.meta = meta
        try:
            self.feature_names: list[str] = [str(name) for name in meta["feature_names"]]
            self.tau: float = float(meta["tau_rf"])
            self.mean = np.asarray(meta["mean"], dtype=np.float64)
            self.std = np.asarray(meta["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"The lesion classifier's feature file is incomplete ({error!r}); export it again.") from None
        unknown = [name for name in self.feature_names if name not in _known_names()]
        if unknown:
            raise BundleError(f"The lesion classifier uses features this LiverTumorSeg does not know: {', '.join(unknown[:5])}.")
        if not (len(self.mean) == len(self.std) == len(self.feature_names)):
            raise BundleError("The lesion classifier's standardisation does not match its feature list; export it again.")
        trained_with = str(meta.get("pyradiomics_version") or "")
        if trained_with and _major(trained_with) != _major(pyradiomics_version()):
            raise BundleError(
                f"The lesion classifier was trained with pyradiomics {trained_with}, but pyradiomics "
                f"{pyradiomics_version()} is installed; features of another major version differ. Install pyradiomics "
                f"{_major(trained_with)}.x, retrain the classifier, or switch the radiomics filter off."
            )
        settings = meta.get("settings")
        if settings != json.loads(json.dumps(feature_settings())):
            raise BundleError(
                "The lesion classifier was trained with other radiomic feature settings than this LiverTumorSeg "
                "computes; retrain it with this version (livertumorseg-train), or switch the radiomics filter off."
            )
        self._input = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        self._output = "probabilities" if "probabilities" in outputs else outputs[-1]

    @classmethod
    def from_bundle(cls, bundle, *, threads: int | None = None) -> "LesionClassifier":
        entry = bundle.component(COMPONENT)
        features_file = entry.get("features_file")
        if not features_file or features_file not in bundle.manifest.get("files", {}):
            raise BundleError(f"Bundle '{bundle.path}': the lesion classifier's feature file is missing from the manifest.")
        _radiomics()  # fail before any work when pyradiomics is missing
        try:
            meta = json.loads((bundle.path / features_file).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"Bundle '{bundle.path}': '{features_file}' is not valid JSON ({error}).") from None
        return cls(bundle.session(COMPONENT, threads=threads or 1), meta)

    @classmethod
    def from_files(cls, onnx_path, json_path, *, threads: int | None = 1) -> "LesionClassifier":
        """Load from an ONNX file and its JSON (training and tests; the pipeline uses :meth:`from_bundle`)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        meta = json.loads(open(json_path, encoding="utf-8").read())
        return cls(ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]), meta)

    def standardise(self, features: list[dict]) -> np.ndarray:
        """(N, n_features) float32: (x − mean) / std; non-finite values become 0 (the training mean)."""
        x = np.array([[f.get(name, math.nan) for name in self.feature_names] for f in features], dtype=np.float64)
        x = x.reshape(len(features), len(self.feature_names))
        z = (x - self.mean) / self.std
        z[~np.isfinite(z)] = 0.0
        return z.astype(np.float32)

    def predict(self, features: list[dict]) -> np.ndarray:
        """Probability of a true tumour for each feature dict."""
        if not features:
            return np.zeros(0, np.float64)
        x = self.standardise(features)
        probabilities = self.session.run([self._output], {self._input: x})[0]
        return np.asarray(probabilities, dtype=np.float64)[:, 1]


# ------------------------------------------------------------------------------------------ the filter


def _candidate_task(args):
    hu, mask, spacing, names = args
    return extract_features(hu, mask, spacing, only=names)


def candidates(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of the tumour label (``ndimage.label`` order, 1-based)."""
    return ndimage.label(labels == 2, structure=CONNECTIVITY)


def filter_lesions(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_xyz: tuple,
    classifier: LesionClassifier,
    *,
    threads: int = 1,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    executor: str = "auto",
) -> tuple[np.ndarray, dict[int, float], dict]:
    """Drop candidate lesions the classifier rejects (probability < τ_rf): they become liver (1).

    Returns the new label map, ``{component index → probability}`` for the kept candidates (indices in
    ``ndimage.label`` order of the input's tumour label, 26-connected, from 1) and an info dict.
    ``executor``: "serial", "thread", "process" or "auto" (one worker: serial; two: threads; more:
    processes — see the module notes).
    """
    started = time.perf_counter()

    def check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("Radiomics filtering was cancelled; nothing was written.")

    check_cancel()
    if progress:
        progress(STAGE, 0.0)
    components, count = candidates(labels)
    boxes = ndimage.find_objects(components)
    names = classifier.feature_names
    tasks = []
    for index, box in enumerate(boxes, start=1):
        crop = crop_box(box, labels.shape)
        tasks.append((np.ascontiguousarray(hu[crop]), components[crop] == index, tuple(spacing_xyz), names))
    features: list[dict | None] = [None] * count
    workers = max(1, min(int(threads or 1), count))
    if executor not in ("auto", "serial", "thread", "process"):
        raise ValueError(f"executor must be 'auto', 'serial', 'thread' or 'process', not {executor!r}")
    kind = executor if executor != "auto" else ("serial" if workers == 1 else "thread" if workers == 2 else "process")
    if kind == "process" and not _python_workers_possible():
        kind = "thread"
    t0 = time.perf_counter()
    if workers == 1 or kind == "serial":
        kind, workers = "serial", 1
        for i, task in enumerate(tasks):
            check_cancel()
            features[i] = _candidate_task(task)
            if progress:
                progress(STAGE, 0.9 * (i + 1) / count)
    else:
        pool_class = ProcessPoolExecutor if kind == "process" else ThreadPoolExecutor
        pool = pool_class(max_workers=workers, **({"mp_context": _mp_context()} if kind == "process" else {}))
        done_count = 0
        try:
            # Largest candidates first, so that one big lesion does not finish last on its own.
            order = sorted(range(count), key=lambda i: -int(tasks[i][1].sum()))
            pending = {pool.submit(_candidate_task, tasks[i]): i for i in order}
            while pending:
                check_cancel()
                done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    features[pending.pop(future)] = future.result()
                    done_count += 1
                    if progress:
                        progress(STAGE, 0.9 * done_count / count)
        except BrokenProcessPool as error:
            # Worker processes could not start (e.g. a host whose main module cannot be re-imported):
            # finish in this process rather than fail the segmentation.
            log.warning("Radiomics worker processes failed (%s); continuing in one process.", error)
            kind = "serial (worker processes failed)"
            for i in range(count):
                if features[i] is None:
                    check_cancel()
                    features[i] = _candidate_task(tasks[i])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    extract_s = time.perf_counter() - t0
    check_cancel()
    probabilities = classifier.predict(features) if count else np.zeros(0)
    # A lesion whose selected features could not all be computed is kept: its probability would rest on
    # imputed training means, not on the lesion.
    failures = {i + 1: n for i, f in enumerate(features)
                if (n := sum(not math.isfinite(float(f.get(name, math.nan))) for name in names))}
    kept = {i + 1: float(p) for i, p in enumerate(probabilities) if p >= classifier.tau or i + 1 in failures}
    dropped = {i + 1: float(p) for i, p in enumerate(probabilities) if i + 1 not in kept}
    out = labels.copy()
    if dropped:
        out[np.isin(components, list(dropped))] = 1
    if progress:
        progress(STAGE, 1.0)
    info = {
        "candidates": int(count),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_probabilities": dropped,
        "tau_rf": classifier.tau,
        "features": len(names),
        "feature_failures": failures,  # candidate index → number of selected features that could not be computed
        "kept_despite_failed_features": sorted(i for i in failures if probabilities[i - 1] < classifier.tau),
        "executor": kind,
        "workers": workers,
        "timings_s": {"features": round(extract_s, 3), "total": round(time.perf_counter() - started, 3)},
    }
    return out, kept, info


def _python_workers_possible() -> bool:
    """Worker processes re-run ``sys.executable``; inside an application that embeds Python (Slicer) that
    is the application, not a Python interpreter."""
    import sys
    from pathlib import Path

    return "python" in Path(sys.executable or "").name.lower()


def _mp_context():
    """Worker processes come from a fork server that has imported this module and pyradiomics once, so a
    pool starts in milliseconds after the first; "spawn" would re-import everything for every pool (and
    the host application's main module), and forking the caller is unsafe in a process that holds
    ONNX Runtime threads."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "radiomics", "radiomics.glcm", "radiomics.glrlm", "radiomics.firstorder"])
    return context
