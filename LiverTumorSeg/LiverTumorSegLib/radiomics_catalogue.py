"""Radiomic feature catalogue of the false-positive filter (paper §3.3.2): the 728 names, their groups and
the extraction settings stored with a trained classifier.

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

Choices, and why (how the features are computed is :mod:`.radiomics_features`):

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
"""

from __future__ import annotations

import logging

from .errors import LiverTumorSegError

BIN_WIDTH = 4.0
HISTOGRAM_MAX_BINS = 200
TEXTURE_BIN_COUNT = 128
GRADIENT_SIGMA_VOXELS = 1.5
BOUNDARY_BAND_MM = 2.0
WAVELET = "coif1"
MARGIN_VOXELS = 6

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
#: The names as a set, to check requested names against.
KNOWN_NAMES = frozenset(FEATURE_NAMES)


def pyradiomics_version() -> str:
    """The installed pyradiomics version (recorded with a trained classifier; the major version must match)."""
    return str(getattr(import_pyradiomics(), "__version__", "unknown"))


def major_version(version: str) -> str:
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


def import_pyradiomics():
    """pyradiomics with its feature-class submodules, or a clear error when it cannot be imported."""
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
