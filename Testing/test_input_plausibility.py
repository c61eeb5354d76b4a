"""Inputs that are not CT in HU are refused before any work; results that may be wrong say so.

Each refused case passed the earlier check (some negative value) and ended with volumes wrong by 20–80 %.
"""

import json

import numpy as np
import pytest

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import Geometry, Image
from LiverTumorSegLib.pipeline import (PLAUSIBLE_LIVER_ML, SegmentationResult, check_ct_intensities,
                                       check_result_plausibility, write_outputs)
from LiverTumorSegLib.volumetry import measure

GEOMETRY = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _abdomen(shape=(20, 96, 96), seed=0) -> np.ndarray:
    """Air around a body: a fat shell, soft tissue inside, a spine; CT noise σ 12 HU."""
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    r = ((yy - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((xx - shape[2] / 2) / (shape[2] * 0.45)) ** 2
    plane = np.where(r < 1, -100.0, -1000.0)
    plane[r < 0.7] = 50.0
    plane[(np.abs(yy - shape[1] * 0.7) < 5) & (np.abs(xx - shape[2] / 2) < 5)] = 700.0
    noise = np.random.default_rng(seed).normal(0, 12, shape)
    return (plane[None] + noise).astype(np.int16)


def test_ct_in_hu_passes():
    assert check_ct_intensities(Image(_abdomen(), GEOMETRY)) == []


def test_liver_crop_without_air_passes_with_a_warning():
    """A tight crop (liver and some surrounding fat, no air) is still CT in HU."""
    crop = np.full((20, 40, 40), 110, np.int16)
    crop[:, :, :3] = -100  # fat at the crop's edge: 7.5 % of the voxels
    warnings = check_ct_intensities(Image(crop, GEOMETRY))
    assert len(warnings) == 1 and "Almost no air-like voxels" in warnings[0]


@pytest.mark.parametrize(
    "make, message",
    [
        # HU + 1024 stored without the rescale intercept, padding −2000 outside the scan circle
        (lambda: np.where(_abdomen() < -500, -2000, _abdomen() + 1024).astype(np.int16), "above 1000 HU"),
        (lambda: np.clip(_abdomen() // 8, -128, 127).astype(np.int8), "8 bits"),
        # PET in SUV: zero outside the body with slightly negative noise, 1–8 inside
        (lambda: np.where(_abdomen() < -500, 0, 2 + (_abdomen() > 0) * 4).astype(np.float32)
         + np.random.default_rng(1).normal(0, 0.3, (20, 96, 96)).astype(np.float32), "neither air"),
        # PET in Bq/mL: thousands inside the body
        (lambda: np.where(_abdomen() < -500, 0, 6000).astype(np.float32)
         + np.random.default_rng(2).normal(0, 40, (20, 96, 96)).astype(np.float32), "above 1000 HU"),
    ],
    ids=["hu-plus-1024", "int8", "pet-suv", "pet-bq-ml"],
)
def test_non_hu_intensities_are_refused(make, message):
    with pytest.raises(InputError, match=message) as raised:
        check_ct_intensities(Image(make(), GEOMETRY))
    assert "--skip-intensity-check" in str(raised.value)


def _box_liver(shape, box, spacing=(1.0, 1.0, 2.0)):
    labels = np.zeros(shape, np.uint8)
    labels[box] = 1
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return labels, measure(labels, np.zeros(shape, np.int16), geometry), geometry


def test_plausible_liver_gives_no_warning():
    # 60 × 100 × 100 voxels of 2 mm³: 1,200 mL, away from every edge
    labels, volumetry, _ = _box_liver((70, 120, 120), (slice(5, 65), slice(10, 110), slice(10, 110)))
    assert volumetry["liver_volume_ml"] == 1200.0
    assert check_result_plausibility(labels, volumetry) == []


@pytest.mark.parametrize("box, volume", [((slice(5, 15), slice(10, 110), slice(10, 110)), 200.0),
                                         ((slice(5, 65), slice(0, 200), slice(5, 205)), 4800.0)])
def test_liver_volume_out_of_range_is_flagged(box, volume):
    labels, volumetry, _ = _box_liver((70, 210, 210), box)
    assert volumetry["liver_volume_ml"] == volume
    warnings = check_result_plausibility(labels, volumetry)
    assert any(f"{volume:.0f} mL is outside the usual adult range" in w for w in warnings)
    assert PLAUSIBLE_LIVER_ML == (600.0, 4500.0)


def test_liver_cut_by_the_field_of_view_is_flagged():
    labels, volumetry, _ = _box_liver((70, 120, 120), (slice(0, 60), slice(10, 110), slice(10, 110)))
    [warning] = check_result_plausibility(labels, volumetry)
    assert "touches the edge of the image (first slice)" in warning


def test_warnings_reach_run_json_and_the_report(tmp_path):
    labels, volumetry, geometry = _box_liver((70, 120, 120), (slice(0, 10), slice(10, 110), slice(10, 110)))
    warnings = check_result_plausibility(labels, volumetry)
    assert len(warnings) == 2
    details = {"bundle": "test", "stages": {}, "timings_s": {}, "warnings": warnings}
    image = Image(np.zeros(labels.shape, np.int16), geometry)
    out = write_outputs(SegmentationResult(image.with_array(labels), volumetry, details), image, tmp_path / "out")
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["warnings"] == warnings
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "outside the usual adult range" in report and "touches the edge of the image" in report
