"""HTML report: values, embedded PNGs that open, and the radiological display convention."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image as PILImage

from LiverTumorSegLib.errors import OutputError
from LiverTumorSegLib.image_io import Geometry, Image, to_canonical
from LiverTumorSegLib.report import canonical_axes, canonical_view, write_report
from LiverTumorSegLib.volumetry import measure

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # voxel axes point to patient right, anterior, superior


def embedded_pngs(page):
    return [PILImage.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def marker_case():
    """RAS-oriented volume: a bright block in the patient's right-anterior-superior corner, liver beside it."""
    shape = (20, 40, 50)
    geometry = Geometry((0.8, 0.8, 2.5), (10.0, -5.0, 30.0), RAS)
    ct = np.full(shape, -1000, np.int16)
    ct[10:, 20:, 25:] = 1000  # high x index = right, high y index = anterior, high z index = superior
    labels = np.zeros(shape, np.uint8)
    labels[11:19, 22:38, 5:45] = 1
    labels[13:17, 26:32, 8:14] = 2
    labels[13:15, 34:36, 40:42] = 2
    return ct, labels, geometry


def test_report_contains_values_details_note_and_valid_pngs(tmp_path):
    ct, labels, geometry = marker_case()
    probability = np.zeros(labels.shape, np.float32)
    probability[13:17, 26:32, 8:14] = 0.87  # the larger lesion's classifier probability
    volumetry = measure(labels, ct, geometry, probability_map=probability)
    out = tmp_path / "report" / "case <1>.html"
    details = {"model bundle": "demo-phantom 0.1.0", "stages": ["postprocess", "volumetry"],
               "timings (s)": {"postprocess": 1.23456, "volumetry": 0.5}}
    written = write_report(out, ct, labels, geometry, volumetry, title="Case <1> & liver", details=details)
    assert written == [out] and out.exists()
    page = out.read_text(encoding="utf-8")
    assert "Case &lt;1&gt; &amp; liver" in page and "<1>" not in page
    assert "Research use only" in page and "reviewed" in page and "clinician" in page
    assert f"{volumetry['liver_volume_ml']:.2f} mL" in page
    assert f"{volumetry['tumour_volume_ml']:.2f} mL" in page
    assert f"{volumetry['tumour_burden_percent']:.2f} %" in page
    first, second = volumetry["lesions"]
    for lesion in (first, second):
        assert f"{lesion['volume_ml']:.2f}" in page
        assert f"{lesion['longest_axial_diameter_mm']:.1f}" in page
        assert f"{lesion['mean_hu']:.0f} ± {lesion['std_hu']:.0f}" in page
    x, y, z = first["centroid_lps_mm"]
    assert f"{-x:.1f}, {-y:.1f}, {z:.1f}" in page  # RAS, as 3D Slicer shows
    assert "0.87" in page and "—" in page  # lesion 2 has no classifier probability
    assert "demo-phantom 0.1.0" in page and "postprocess, volumetry" in page and "1.235" in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 2
    for png in pngs:
        png.load()
        assert png.format == "PNG" and min(png.size) > 100
    # Aspect ratio from the spacing: axial 40 x 32 mm, coronal 40 mm wide x 50 mm high.
    axial, coronal = pngs
    assert axial.size[0] / axial.size[1] == pytest.approx(40 / 32, rel=0.03)
    assert coronal.size[0] / coronal.size[1] == pytest.approx(40 / 50, rel=0.03)


def quadrant_means(png):
    grey = np.asarray(png.convert("L"), dtype=float)
    h, w = grey.shape
    return {"top-left": grey[: h // 2, : w // 2].mean(), "top-right": grey[: h // 2, w // 2:].mean(),
            "bottom-left": grey[h // 2:, : w // 2].mean(), "bottom-right": grey[h // 2:, w // 2:].mean()}


def test_radiological_display_convention(tmp_path):
    ct, labels, geometry = marker_case()
    labels[labels == 2] = 1  # no lesion: slices through the liver's centre
    volumetry = measure(labels, ct, geometry)
    out = tmp_path / "report.html"
    write_report(out, ct, labels, geometry, volumetry, title="orientation", details={})
    axial, coronal = embedded_pngs(out.read_text(encoding="utf-8"))
    for png in (axial, coronal):  # patient right on the image's left; anterior / superior on top
        means = quadrant_means(png)
        assert means["top-left"] > 150
        assert max(v for k, v in means.items() if k != "top-left") < 60
    assert "No liver tumour was detected" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("direction", [
    RAS,
    (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # LPI
    (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # PIL: a permuted, flipped acquisition
])
def test_canonical_view_matches_image_io_reorientation(direction):
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    geometry = Geometry((0.5, 0.7, 2.0), (1.0, 2.0, 3.0), direction)
    expected, _ = to_canonical(Image(array, geometry))
    assert np.array_equal(canonical_view(array, canonical_axes(geometry)), expected.array)


def test_report_refuses_overwrite(tmp_path):
    ct, labels, geometry = marker_case()
    volumetry = measure(labels, ct, geometry)
    out = tmp_path / "report.html"
    out.write_text("previous")
    with pytest.raises(OutputError, match="already exists"):
        write_report(out, ct, labels, geometry, volumetry, title="t", details={})
    assert out.read_text(encoding="utf-8") == "previous"
    write_report(out, ct, labels, geometry, volumetry, title="t", details={}, overwrite=True)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
