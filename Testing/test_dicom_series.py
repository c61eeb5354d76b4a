"""DICOM series folders: series choice, geometry checks and gantry-tilt correction, on real DICOM files."""

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import read_image

STUDY = "1.2.826.0.1.3680043.2.1125.7"
SERIES_A = "1.2.826.0.1.3680043.2.1125.7.1"
SERIES_B = "1.2.826.0.1.3680043.2.1125.7.2"
AXIAL = (1, 0, 0, 0, 1, 0)
SIZE = 32


def _write_slice(path: Path, hu: np.ndarray, position, *, series=SERIES_A, instance=1, orientation=AXIAL,
                 pixel=0.75, thickness=2.0, kernel="B30f", sop=None, description="abdomen") -> None:
    """One CT slice: int16 stored values with RescaleIntercept −1024, so ``hu`` comes back as read."""
    sop = sop or f"{series}.{instance}"
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, series, "CT"
    ds.SeriesDescription, ds.ConvolutionKernel, ds.InstanceNumber = description, kernel, instance
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing, ds.SliceThickness = [pixel, pixel], thickness
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, depths, *, origin=(-10.0, -20.0, 0.0), shift=(0.0, 0.0), **options) -> list[Path]:
    """Axial slices at the given z (mm); slice k's HU is 10·k so the slice order can be checked."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, z in enumerate(depths):
        position = (origin[0] + shift[0] * z, origin[1] + shift[1] * z, origin[2] + z)
        path = folder / f"{options.get('series', SERIES_A)[-1]}_{k:03d}.dcm"
        _write_slice(path, np.full((SIZE, SIZE), 10 * k, np.int16), position, instance=k + 1, **options)
        paths.append(path)
    return paths


def test_good_series_reads_with_exact_geometry(tmp_path):
    _series(tmp_path, [2.5 * k for k in range(10)][::-1])  # written top-down: order comes from the positions
    image = read_image(tmp_path)
    assert image.array.shape == (10, SIZE, SIZE)
    assert image.geometry.spacing == pytest.approx((0.75, 0.75, 2.5), abs=1e-9)
    assert image.geometry.origin == pytest.approx((-10.0, -20.0, 0.0), abs=1e-9)
    assert image.geometry.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert [int(v) for v in image.array[:, 0, 0]] == [10 * (9 - k) for k in range(10)]


def test_missing_slice_is_refused_and_named(tmp_path):
    _series(tmp_path, [2.0 * k for k in range(10) if k != 6])
    with pytest.raises(InputError, match=r"missing slice\(s\) between positions 10.00 and 14.00 mm "
                                         r"\(instance 6 .* and instance 7 "):
        read_image(tmp_path)


def test_different_slices_at_one_position_are_refused(tmp_path):
    _series(tmp_path, [2.0 * k for k in range(8)] + [6.0])
    with pytest.raises(InputError, match=r"same position: instance 4 .* and instance 9 .* at 6.00 mm"):
        read_image(tmp_path)


def test_exact_copies_are_left_out(tmp_path, caplog):
    paths = _series(tmp_path, [2.0 * k for k in range(8)])
    (tmp_path / "copy_of_4.dcm").write_bytes(paths[3].read_bytes())
    with caplog.at_level("WARNING", logger="LiverTumorSeg"):
        image = read_image(tmp_path)
    assert image.array.shape == (8, SIZE, SIZE) and image.geometry.spacing[2] == pytest.approx(2.0)
    assert "duplicate copy" in caplog.text and "instance 4" in caplog.text


def test_non_uniform_spacing_is_refused(tmp_path):
    _series(tmp_path, [0, 2, 4, 6, 8, 10, 12.5, 14.5, 16.5, 18.5])
    with pytest.raises(InputError, match=r"non-uniform slice spacing.*2.5 mm between instance 6"):
        read_image(tmp_path)


def test_rounded_positions_are_not_uneven(tmp_path):
    """Positions rounded to 0.01 mm make a 0.625 mm series step by 0.62 or 0.63 mm: still uniform."""
    _series(tmp_path, [round(0.625 * k, 2) for k in range(12)])
    assert read_image(tmp_path).geometry.spacing[2] == pytest.approx(0.625, abs=0.001)


def test_localizer_in_the_series_is_left_out(tmp_path, caplog):
    _series(tmp_path, [3.0 * k for k in range(10)])
    _write_slice(tmp_path / "scout.dcm", np.zeros((SIZE, SIZE), np.int16), (-10, 0, 40), instance=0,
                 orientation=(1, 0, 0, 0, 0, -1))
    with caplog.at_level("WARNING", logger="LiverTumorSeg"):
        image = read_image(tmp_path)
    assert image.array.shape == (10, SIZE, SIZE) and image.geometry.spacing[2] == pytest.approx(3.0)
    assert "localizer" in caplog.text and "scout.dcm" in caplog.text


def test_missing_position_is_refused_and_named(tmp_path):
    _series(tmp_path, [2.0 * k for k in range(8)])
    _write_slice(tmp_path / "A_008.dcm", np.zeros((SIZE, SIZE), np.int16), None, instance=9)
    with pytest.raises(InputError, match=r"1 of 9 files .* ImagePositionPatient .*instance 9 \(A_008.dcm\)"):
        read_image(tmp_path)


def test_half_and_half_orientations_are_refused(tmp_path):
    _series(tmp_path, [3.0 * k for k in range(4)])
    _series(tmp_path, [3.0 * k for k in range(4)], series=SERIES_A + "0", orientation=(1, 0, 0, 0, 0, -1))
    for path in tmp_path.glob("0_*.dcm"):  # same series UID, other orientation, other instances
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.InstanceNumber = SERIES_A, ds.InstanceNumber + 10
        ds.save_as(path)
    with pytest.raises(InputError, match="mixes slice orientations"):
        read_image(tmp_path)


def test_origins_off_a_line_are_refused(tmp_path):
    paths = _series(tmp_path, [2.0 * k for k in range(8)])
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient = [-7.0, -20.0, 8.0]  # 3 mm off in x, only this slice
    ds.save_as(paths[4])
    with pytest.raises(InputError, match=r"do not lie on a straight line \(instance 5 .* is [\d.]+ mm off"):
        read_image(tmp_path)


@pytest.mark.parametrize("tilted_planes", [False, True], ids=["sheared-origins", "tilted-planes"])
def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path, caplog, tilted_planes):
    """A bright column along the slice normal must come out along the output's slice axis.

    Sheared origins: axial planes whose origins move by tan(26.57°)·z along y. Tilted planes (as a
    scanner writes them): planes tilted by 30° about x, origins straight along z. Both move the
    origins by one pixel (1 mm) in-plane per slice.
    """
    count, column = 10, (8, 20)
    if tilted_planes:
        angle = 30.0
        orientation = (1, 0, 0, 0, math.cos(math.radians(angle)), math.sin(math.radians(angle)))
        origins = [np.array([0.0, 0.0, 2.0 * k]) for k in range(count)]
    else:
        angle = math.degrees(math.atan(0.5))
        orientation = AXIAL
        origins = [np.array([0.0, 0.5 * 2.0 * k, 2.0 * k]) for k in range(count)]
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    step = float((origins[1] - origins[0]) @ normal)
    for k, origin in enumerate(origins):
        # The column passes through the point origins[0] + (x, y) of the first slice, along the normal.
        offset = origins[0] + column[0] * row + column[1] * col - origin
        x, y = round(float(offset @ row)), round(float(offset @ col))
        hu = np.full((SIZE, SIZE), 40, np.int16)
        hu[y, x] = 1000
        _write_slice(tmp_path / f"t_{k:03d}.dcm", hu, origin, instance=k + 1, orientation=orientation, pixel=1.0)
    with caplog.at_level("WARNING", logger="LiverTumorSeg"):
        image = read_image(tmp_path)
    assert f"gantry tilt of {angle:.2f}°" in caplog.text
    assert image.geometry.spacing == pytest.approx((1.0, 1.0, step), abs=1e-5)
    assert np.allclose(image.geometry.direction_matrix, np.column_stack([row, col, normal]), atol=1e-5)
    assert image.array.shape == (count, SIZE + count - 1, SIZE)  # grown by the drift of (count-1) pixels
    peaks = {np.unravel_index(np.argmax(plane), plane.shape) for plane in image.array}
    assert len(peaks) == 1  # the column is straight along the output slice axis
    (y, x), = peaks
    point = image.geometry.index_to_physical(np.array([0, y, x]))
    assert point == pytest.approx(origins[0] + column[0] * row + column[1] * col, abs=1e-4)  # 6-decimal headers
    assert image.array[:, y, x] == pytest.approx(1000, abs=1)
    assert image.array.min() == -1024 and np.median(image.array) == 40  # air only outside the scanned field


def test_equal_sizes_pick_the_thinner_series_and_series_picks_the_other(tmp_path, caplog):
    _series(tmp_path, [1.0 * k for k in range(8)], series=SERIES_B, thickness=1.0, kernel="B70f")
    _series(tmp_path, [3.0 * k for k in range(8)], series=SERIES_A, thickness=3.0)
    with caplog.at_level("WARNING", logger="LiverTumorSeg"):
        assert read_image(tmp_path).geometry.spacing[2] == pytest.approx(1.0)
    assert f"holds 2 DICOM series; using {SERIES_B} (8 files" in caplog.text and f"{SERIES_A} (8 files)" in caplog.text
    assert read_image(tmp_path, series=SERIES_A).geometry.spacing[2] == pytest.approx(3.0)


def test_equal_size_and_spacing_prefer_the_soft_tissue_kernel(tmp_path):
    _series(tmp_path, [2.0 * k for k in range(6)], series=SERIES_A, kernel="LUNG")
    _series(tmp_path, [2.0 * k for k in range(6)], series=SERIES_B, kernel="STANDARD", origin=(0, 0, 100))
    assert read_image(tmp_path).geometry.origin[2] == pytest.approx(100.0)


def test_unknown_series_lists_the_available_ones(tmp_path):
    _series(tmp_path, [2.0 * k for k in range(6)], series=SERIES_A, description="venous")
    _series(tmp_path, [2.0 * k for k in range(4)], series=SERIES_B, description="arterial")
    with pytest.raises(InputError, match=rf"'1.2.3' is not in .*{SERIES_A} \(6 files, 'venous'\); "
                                         rf"{SERIES_B} \(4 files, 'arterial'\)"):
        read_image(tmp_path, series="1.2.3")


def test_cli_refuses_an_unknown_series_before_segmenting(tmp_path, capsys):
    _series(tmp_path / "ct", [2.0 * k for k in range(6)])
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "ct"), "--series", "1.2.3", "-o", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "'1.2.3' is not in" in err and SERIES_A in err and "Traceback" not in err
    assert not out.exists()
