"""Read stage: reading, validation, canonical orientation and atomic writing with real SimpleITK files."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError, OutputError
from LiverTumorSegLib.image_io import Geometry, Image, from_canonical, read_image, to_canonical, write_image

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _oblique_flipped_image(rng) -> Image:
    """A volume whose voxel axes are permuted, flipped and slightly rotated away from LPS."""
    angle = math.radians(12)
    direction = np.array(
        [[0, 0, -1], [math.cos(angle), math.sin(angle), 0], [-math.sin(angle), math.cos(angle), 0]]
    )
    geometry = Geometry((0.7, 0.8, 2.5), (12.5, -40.0, 310.0), tuple(direction.ravel()))
    return Image(rng.integers(-1000, 1500, size=(6, 7, 9)).astype(np.int16), geometry)


def test_canonical_round_trip_is_exact(tmp_path, rng):
    image = _oblique_flipped_image(rng)
    path = write_image(image, tmp_path / "oblique.nrrd")
    read = read_image(path)
    canonical, orientation = to_canonical(read)
    # Canonical: voxel axes point (nearest) to L, P, S; the residual rotation stays in the direction.
    d = canonical.geometry.direction_matrix
    assert np.all(np.diag(d) > 0.9)
    # Voxel values keep their physical position in the canonical image.
    point = read.geometry.index_to_physical(np.array([2, 3, 4]))
    index = canonical.to_sitk().TransformPhysicalPointToIndex(point.tolist())
    assert canonical.array[index[::-1]] == read.array[2, 3, 4]
    back = from_canonical(canonical.array, orientation)
    assert np.array_equal(back.array, image.array)
    assert back.geometry == read.geometry
    out = write_image(back, tmp_path / "back.nii.gz")
    again = read_image(out)
    assert np.array_equal(again.array, image.array)
    np.testing.assert_allclose(again.geometry.spacing, image.geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(again.geometry.origin, image.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(again.geometry.direction, image.geometry.direction, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_formats_round_trip(tmp_path, rng, suffix):
    image = Image(rng.integers(-1024, 3000, size=(4, 5, 6)).astype(np.int16), Geometry((0.6, 0.6, 3.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    read = read_image(write_image(image, tmp_path / f"ct{suffix}"))
    assert np.array_equal(read.array, image.array)
    np.testing.assert_allclose(read.geometry.spacing, image.geometry.spacing, rtol=1e-6)


def test_dicom_series_folder_picks_largest_series(tmp_path, rng, caplog):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for series, slices in (("1.2.826.0.1.3680043.2.1125.1", 5), ("1.2.826.0.1.3680043.2.1125.2", 3)):
        for k in range(slices):
            image = sitk.GetImageFromArray(rng.integers(-1000, 1000, size=(1, 8, 8)).astype(np.int16)[0])
            image.SetSpacing((0.75, 0.75))
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            for tag, value in {
                "0020|000e": series, "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{2.0 * k}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.0", "0008|0060": "CT",
                "0008|0018": f"{series}.{k + 1}", "0028|0030": "0.75\\0.75",
            }.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{series[-1]}_{k}.dcm"))
            writer.Execute(image)
    with caplog.at_level("WARNING", logger="LiverTumorSeg"):
        read = read_image(folder)
    assert read.array.shape == (5, 8, 8)
    assert read.geometry.spacing[2] == pytest.approx(2.0)
    assert "2 DICOM series" in caplog.text and "3 files" in caplog.text


def test_real_cases_read_with_expected_geometry_and_hu():
    ct = read_image(REAL / "sbme_lits_resized64_ct.nii.gz")
    label = read_image(REAL / "sbme_lits_resized64_label.nii.gz", kind="label map")
    assert ct.array.shape == label.array.shape == (33, 64, 64)
    np.testing.assert_allclose(ct.geometry.spacing, (0.664, 0.664, 5.0), atol=1e-3)
    assert ct.array.min() == pytest.approx(-1024) and 300 < ct.array.max() < 2000
    assert set(np.unique(label.array)) == {0, 1, 2}
    ct3 = read_image(REAL / "dcmqi_ct3slice_ct.nii.gz")
    assert ct3.array.shape == (3, 512, 512)
    np.testing.assert_allclose(ct3.geometry.spacing, (0.8105, 0.8105, 1.0), atol=1e-3)
    liver = read_image(REAL / "dcmqi_ct3slice_label.nii.gz").array == 1
    assert ct3.array.min() == -3024 and 0 < ct3.array[liver].mean() < 100  # soft tissue, unenhanced liver


def _write_raw(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.0), components=False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=components)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.nii.gz", "not found"),
        (lambda d: _touch(d / "empty.nii.gz"), "empty file"),
        (lambda d: _text(d / "notes.nii.gz", "this is not an image"), "could not be read"),
        (lambda d: _truncated(d / "cut.nii.gz"), "truncated"),
        (lambda d: _truncated(d / "cut.nii"), "truncated"),
        (lambda d: _truncated(d / "cut.nrrd"), "truncated"),
        (lambda d: _truncated(d / "cut.mha"), "truncated"),
        (lambda d: _write_raw(d / "slice.nrrd", np.zeros((16, 16), np.int16), (0.8, 0.8)), "2D image"),
        (lambda d: _write_raw(d / "series4d.nrrd", np.zeros((2, 4, 6, 6), np.int16), (0.8, 0.8, 2.0, 1.0)), "4D image"),
        (lambda d: _write_raw(d / "rgb.nrrd", np.zeros((4, 6, 6, 3), np.uint8), components=True), "3 components"),
        (lambda d: _write_raw(d / "thin.nrrd", np.zeros((2, 8, 8), np.int16)), "only 2 slice"),
        (lambda d: _write_raw(d / "nan.nrrd", np.full((4, 8, 8), np.nan, np.float32)), "NaN"),
        (lambda d: _empty_dicom_dir(d), "No DICOM series"),
    ],
)
def test_bad_inputs_get_clear_errors(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        read_image(make(tmp_path))


def test_zero_spacing_is_refused(tmp_path):
    header = "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 0 1 1\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / "zero.mha"
    path.write_bytes(header.encode() + np.zeros(64, np.int16).tobytes())
    with pytest.raises(InputError, match="invalid voxel spacing"):
        read_image(path)


def test_negative_spacing_becomes_a_flipped_axis(tmp_path):
    """ITK reads a negative spacing as a flipped axis with a positive spacing: a valid image."""
    header = "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = -1 1 1\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / "negative.mha"
    path.write_bytes(header.encode() + np.zeros(64, np.int16).tobytes())
    image = read_image(path)
    assert image.geometry.spacing == (1.0, 1.0, 1.0) and image.geometry.direction[0] == -1.0


def test_write_is_atomic_and_never_overwrites(tmp_path, rng):
    image = Image(rng.integers(0, 3, size=(3, 4, 5)).astype(np.uint8), Geometry((1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    path = write_image(image, tmp_path / "labels.nii.gz")
    before = path.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        write_image(image.with_array(image.array * 0), path)
    assert path.read_bytes() == before
    write_image(image.with_array(image.array * 0), path, overwrite=True)
    assert read_image(path).array.max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]  # no temporary left behind
    with pytest.raises(OutputError, match="unknown image format"):
        write_image(image, tmp_path / "labels.png")


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncated(path: Path) -> Path:
    full = path.with_name("full" + "".join(path.suffixes))
    _write_raw(full, np.arange(4 * 32 * 32, dtype=np.int16).reshape(4, 32, 32))
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return path


def _empty_dicom_dir(directory: Path) -> Path:
    folder = directory / "series"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


def _nifti_with_scaling(path, raw: np.ndarray, slope: float, intercept: float):
    """A NIfTI-1 file holding ``raw`` with scl_slope/scl_inter set (header bytes 112 and 116)."""
    plain = path.with_name("plain.nii")
    sitk.WriteImage(sitk.GetImageFromArray(raw), str(plain))
    data = bytearray(plain.read_bytes())
    data[112:120] = np.array([slope, intercept], "<f4").tobytes()
    plain.unlink()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("name", ["scaled.nii", "scaled.nii.gz"])
@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (0.5, 0.0)])
def test_nifti_with_rescale_slope_and_intercept_is_read_not_refused(tmp_path, name, slope, intercept):
    """The stored type is uint16 (2 bytes); ITK returns float32 after scaling, which is not what the file holds."""
    raw = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7) * 7
    image = read_image(_nifti_with_scaling(tmp_path / name, raw, slope, intercept))
    np.testing.assert_allclose(image.array, raw * slope + intercept)


def test_multi_member_gzip_is_read_whole(tmp_path):
    """``cat a.gz b.gz`` is one valid gzip file; its second member holds the rest of the voxels."""
    array = np.arange(6 * 8 * 9, dtype=np.int16).reshape(6, 8, 9) - 500
    plain = write_image(Image(array, Geometry((0.8, 0.8, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))),
                        tmp_path / "plain.nii", compress=False)
    data = plain.read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(data[:500]) + gzip.compress(data[500:]))
    np.testing.assert_array_equal(read_image(two).array, array)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(data[:500]) + gzip.compress(data[500:])[:-30])
    with pytest.raises(InputError, match="truncated"):
        read_image(cut)


def test_uncompressed_data_named_nii_gz_is_read(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    plain = write_image(Image(array, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))),
                        tmp_path / "plain.nii", compress=False)
    misnamed = plain.rename(tmp_path / "misnamed.nii.gz")
    np.testing.assert_array_equal(read_image(misnamed).array, array)


@pytest.mark.parametrize("spacing", [(2497.0, 2497.0, 5000.0), (0.0007, 0.0007, 0.002)], ids=["metres-as-mm", "micrometres"])
def test_implausible_spacing_is_refused_with_the_unit_named(tmp_path, spacing):
    path = _write_raw(tmp_path / "odd.nrrd", np.zeros((4, 8, 8), np.int16), spacing)
    with pytest.raises(InputError, match="header's unit is probably wrong"):
        read_image(path)


def test_sheared_direction_is_refused(tmp_path):
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementSpacing = 1 1 1\n"
              "TransformMatrix = 1 0 0 0 1 0 0 0.26 0.97\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path = tmp_path / "sheared.mha"
    path.write_bytes(header.encode() + np.zeros(64, np.int16).tobytes())
    with pytest.raises(InputError, match="non-orthogonal"):
        read_image(path)
