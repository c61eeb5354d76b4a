"""Radiomic feature catalogue of the false-positive filter: real pyradiomics on small synthetic lesions."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

radiomics = pytest.importorskip("radiomics")

from LiverTumorSegLib import radiomics_catalogue as catalogue  # noqa: E402
from LiverTumorSegLib import radiomics_features as features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACING = (1.0, 1.0, 2.5)  # the processing grid: 1 mm in-plane, the scan's slice spacing


def phantom(radius_mm=6.0, shape=(20, 48, 48), spacing=SPACING, seed=0, centre=None):
    """Liver-like background (110 HU, noise) with one hypodense lesion with a brighter rim: (hu, mask)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    centre = centre or (nz // 2, ny // 2, nx // 2)
    z, y, x = np.ogrid[:nz, :ny, :nx]
    d = np.sqrt(((z - centre[0]) * spacing[2]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2 + ((x - centre[2]) * spacing[0]) ** 2)
    hu = np.full(shape, 110.0) + rng.normal(0, 10, shape)
    mask = d <= radius_mm
    hu[mask] = 55 + 25 * (d[mask] / radius_mm) ** 2 + rng.normal(0, 8, int(mask.sum()))
    return np.rint(hu).astype(np.int16), mask


@pytest.fixture(scope="module")
def lesion():
    hu, mask = phantom()
    return hu, mask, features.extract_features(hu, mask, SPACING)


def test_catalogue_has_728_documented_names():
    assert len(catalogue.FEATURE_NAMES) == 728 and len(set(catalogue.FEATURE_NAMES)) == 728
    assert sum(len(names) for _, names in catalogue.BLOCK) == 72
    assert len(catalogue.SHAPE_FEATURES) + len(catalogue.IMAGES) * 72 == 728
    groups = {}
    for name in catalogue.FEATURE_NAMES:
        image, group, _ = name.split("_", 2)
        assert image in catalogue.IMAGES
        groups[group] = groups.get(group, 0) + 1
    assert groups == {"shape": 8, "firstorder": 180, "histogram": 160, "gradient": 20, "glrlm": 110, "glcm": 220, "moments": 30}
    # Every pyradiomics feature used exists in this pyradiomics and is not deprecated there.
    classes = radiomics.getFeatureClasses()
    for group, names in (("shape", catalogue.SHAPE_FEATURES), ("firstorder", catalogue.FIRSTORDER_FEATURES),
                         ("glrlm", catalogue.GLRLM_FEATURES), ("glcm", catalogue.GLCM_FEATURES)):
        available = classes[group].getFeatureNames()
        assert all(n in available and not available[n] for n in names), group
    # The committed table is the one the script writes.
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_feature_table.py"), "--check"], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()


def test_full_catalogue_on_a_lesion_is_728_finite_values(lesion):
    _, _, values = lesion
    assert list(values) == catalogue.FEATURE_NAMES
    array = np.array(list(values.values()))
    assert np.isfinite(array).all()
    # The lesion is darker than its margin band, and its wavelet approximation follows the HU scale.
    assert values["original_firstorder_Mean"] < values["boundary_firstorder_Mean"]
    assert values["original_gradient_Mean"] > 0 and values["wavelet-LLL_firstorder_Mean"] > values["original_firstorder_Mean"]


def test_shape_matches_direct_computation():
    hu, mask = phantom(radius_mm=8.0, spacing=(1.0, 1.0, 1.0), shape=(24, 24, 24))
    values = features.extract_features(hu, mask, (1.0, 1.0, 1.0), only=[
        "original_shape_VoxelVolume", "original_shape_Maximum3DDiameter", "original_shape_Sphericity",
    ])
    assert values["original_shape_VoxelVolume"] == pytest.approx(mask.sum() * 1.0)
    assert abs(values["original_shape_Maximum3DDiameter"] - 16.0) <= 1.5
    assert 0.85 < values["original_shape_Sphericity"] <= 1.0
    anisotropic = features.extract_features(*phantom(), SPACING, only=["original_shape_VoxelVolume"])
    assert anisotropic["original_shape_VoxelVolume"] == pytest.approx(phantom()[1].sum() * 2.5)


def test_only_computes_exactly_the_requested_features(lesion):
    hu, mask, full = lesion
    rng = np.random.default_rng(3)
    names = list(rng.choice(catalogue.FEATURE_NAMES, 30, replace=False)) + ["original_shape_Elongation", "wavelet-HHH_glcm_Idmn"]
    subset = features.extract_features(hu, mask, SPACING, only=names)
    assert list(subset) == list(dict.fromkeys(names))
    for name in subset:
        assert subset[name] == pytest.approx(full[name], rel=1e-12, abs=1e-12), name
    # Without wavelet names the wavelet transform is never run.
    calls = []
    original = features.wavelet_subbands
    features.wavelet_subbands = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        features.extract_features(hu, mask, SPACING, only=["original_glcm_Contrast", "boundary_histogram_Mode"])
        assert calls == []
        features.extract_features(hu, mask, SPACING, only=["wavelet-LLH_firstorder_Mean"])
        assert calls == [1]
    finally:
        features.wavelet_subbands = original
    with pytest.raises(ValueError, match="unknown radiomic feature"):
        features.extract_features(hu, mask, SPACING, only=["original_glcm_MCC"])


def test_extraction_uses_the_bounding_box_only():
    hu, mask = phantom(shape=(20, 48, 48))
    big_hu = np.full((40, 160, 160), -1000, np.int16)
    big_mask = np.zeros(big_hu.shape, bool)
    big_hu[10:30, 50:98, 60:108], big_mask[10:30, 50:98, 60:108] = hu, mask
    names = ["original_firstorder_Mean", "boundary_glrlm_RunPercentage", "wavelet-LHL_moments_J2", "original_moments_J1"]
    a = features.extract_features(hu, mask, SPACING, only=names)
    b = features.extract_features(big_hu, big_mask, SPACING, only=names)
    assert a == pytest.approx(b, rel=1e-12)


def test_moment_invariants_are_translation_and_rotation_invariant():
    hu, mask = phantom(radius_mm=7.0, spacing=SPACING)
    # An irregular region: the lesion plus an off-centre lobe, so that the moment matrix is not isotropic.
    mask = mask.copy()
    mask[9:12, 20:24, 30:36] = True
    j = features.moment_invariants(hu, mask, SPACING)
    shifted = features.moment_invariants(np.roll(hu, (2, -5, 7), axis=(0, 1, 2)), np.roll(mask, (2, -5, 7), axis=(0, 1, 2)), SPACING)
    for key in j:
        assert shifted[key] == pytest.approx(j[key], rel=1e-12)
    # A quarter turn in the axial plane (x and y spacing equal) and a flip are exact rotations of the grid.
    turned = features.moment_invariants(np.rot90(hu, 1, axes=(1, 2)), np.rot90(mask, 1, axes=(1, 2)), SPACING)
    flipped = features.moment_invariants(hu[::-1], mask[::-1], SPACING)
    for key in j:
        assert turned[key] == pytest.approx(j[key], rel=1e-10)
        assert flipped[key] == pytest.approx(j[key], rel=1e-10)
    # Intensity-weighted, not binary: brightening part of the region changes them.
    brighter = hu.copy()
    brighter[9:12, 20:24, 30:36] += 200
    assert features.moment_invariants(brighter, mask, SPACING)["J1"] != pytest.approx(j["J1"], rel=1e-3)


def test_histogram_descriptors():
    values = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10, 11, 40], float)
    h = features.histogram_features(values)
    assert h["Percentile25"] == pytest.approx(np.percentile(values, 25))
    assert h["MedianAbsoluteDeviation"] == pytest.approx(np.median(np.abs(values - np.median(values))))
    # Bins of width 4 from 0: [0,4) holds 4 values, [4,8) 4, [8,12) 6, [40,44) 1.
    assert h["Mode"] == pytest.approx(10.0) and h["ModeProbability"] == pytest.approx(6 / 15)
    assert h["OccupiedBins"] == 4
    assert h["OutlierFraction"] == pytest.approx(1 / 15)
    wide = features.histogram_features(np.array([0.0, 2000.0]))  # beyond 200 bins × 4: the last bin holds it
    assert wide["OccupiedBins"] == 2 and wide["Mode"] == pytest.approx(2.0)


def test_gradient_is_a_gaussian_derivative_with_sigma_of_1_5_voxels():
    z, y, x = np.mgrid[:24, :32, :32].astype(float)
    image = 100 * np.tanh((x - 16) / 3) + 20 * np.sin(y / 5) + 0.5 * z
    ours = features.gradient_magnitude(image, (1.0, 1.0, 1.0))
    itk = sitk.GradientMagnitudeRecursiveGaussian(sitk.GetImageFromArray(image), 1.5)
    reference = sitk.GetArrayFromImage(itk)
    inner = (slice(6, -6),) * 3
    assert np.abs(ours[inner] - reference[inner]).max() < 0.03 * reference[inner].max()
    # Anisotropic voxels: σ and the derivative follow each axis' spacing (a ramp of 2 HU/mm along z).
    ramp = np.broadcast_to((np.arange(20) * 2.5 * 2.0)[:, None, None], (20, 16, 16))
    assert features.gradient_magnitude(ramp, (1.0, 1.0, 2.5))[5:15, 4:12, 4:12] == pytest.approx(2.0, rel=1e-3)


def test_vectorised_glcm_equals_pyradiomics():
    hu, mask = phantom()
    image, region = features._sitk_pair(hu.astype(float), mask, SPACING)
    settings = {"binCount": catalogue.TEXTURE_BIN_COUNT, "distances": [1], "symmetricalGLCM": True, "label": 1}
    results = []
    for cls in (radiomics.glcm.RadiomicsGLCM, features.glcm_class()):
        calculator = cls(image, region, **settings)
        for name in catalogue.GLCM_FEATURES:
            calculator.enableFeatureByName(name)
        results.append(calculator.execute())
    for name in catalogue.GLCM_FEATURES:
        assert float(results[1][name]) == pytest.approx(float(results[0][name]), rel=1e-10, abs=1e-12), name


def test_boundary_band_is_two_mm_either_side():
    _, mask = phantom(radius_mm=6.0)
    band = features.boundary_band_mm(mask, SPACING)
    from scipy import ndimage

    sampling = SPACING[::-1]
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    assert (band & mask).any() and (band & ~mask).any()
    assert (inside[band & mask] <= 2.0).all() and (outside[band & ~mask] <= 2.0).all()
    assert not band[mask & (inside > 2.0)].any() and not band[~mask & (outside > 2.0)].any()


def test_empty_region_is_refused():
    with pytest.raises(ValueError, match="empty"):
        features.extract_features(np.zeros((8, 8, 8), np.int16), np.zeros((8, 8, 8), bool), SPACING)
