"""Training data: dataset layouts (files written in each layout), splits, slice choice and tiles."""

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import Geometry, Image, write_image
from LiverTumorSegLib.preprocess import InputContract
from livertumorseg_training.datasets import find_cases, kfold_split, load_case
from livertumorseg_training.slices import TileSampler, prepare_slices, select_slices

GEOMETRY = Geometry((2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _case(seed: int, shape=(12, 40, 48)):
    """A blocky body with a liver and a tumour: enough to exercise reading and sampling."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000, np.int16)
    ct[:, 5:35, 4:44] = 40
    labels = np.zeros(shape, np.uint8)
    labels[3:9, 10:25, 8:24] = 1
    labels[5:7, 14:18, 12:16] = 2
    ct[labels == 1] = 110
    ct[labels == 2] = 60
    ct = (ct + rng.normal(0, 5, shape)).astype(np.int16)
    return ct, labels


def test_lits_layout(tmp_path):
    for n in (0, 1, 10):
        ct, labels = _case(n)
        suffix = ".nii" if n == 1 else ".nii.gz"
        write_image(Image(ct, GEOMETRY), tmp_path / f"volume-{n}{suffix}")
        write_image(Image(labels, GEOMETRY), tmp_path / f"segmentation-{n}{suffix}")
    write_image(Image(_case(5)[0], GEOMETRY), tmp_path / "volume-5.nii.gz")  # unlabelled: ignored
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["lits-0", "lits-1", "lits-10"]
    image, labels = load_case(cases[2])
    assert image.array.shape == labels.shape and set(np.unique(labels)) == {0, 1, 2}


def test_msd_layout(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for n in (3, 7):
        ct, labels = _case(n)
        write_image(Image(ct, GEOMETRY), tmp_path / "imagesTr" / f"liver_{n}.nii.gz")
        write_image(Image(labels, GEOMETRY), tmp_path / "labelsTr" / f"liver_{n}.nii.gz")
    (tmp_path / "imagesTr" / "._liver_3.nii.gz").write_bytes(b"resource fork")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["msd-liver_3", "msd-liver_7"]
    assert load_case(cases[0])[1].max() == 2


def _dicom_series(folder, array, uid):
    folder.mkdir(parents=True)
    for k, plane in enumerate(array):
        image = sitk.GetImageFromArray(plane.astype(np.int16))
        image.SetSpacing((2.0, 2.0))
        for tag, value in {"0020|000e": uid, "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{3.0 * k}",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0060": "CT", "0008|0018": f"{uid}.{k + 1}",
                           "0028|0030": "2\\2"}.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetImageIO("GDCMImageIO")  # 3D-IRCADb file names have no extension
        writer.SetFileName(str(folder / f"image_{k}"))
        writer.Execute(image)


def test_ircadb_layout(tmp_path):
    ct, labels = _case(2)
    patient = tmp_path / "3Dircadb1.1"
    _dicom_series(patient / "PATIENT_DICOM", ct, "1.2.826.0.1.3680043.2.1125.10")
    _dicom_series(patient / "MASKS_DICOM" / "liver", (labels >= 1) * 255, "1.2.826.0.1.3680043.2.1125.11")
    _dicom_series(patient / "MASKS_DICOM" / "livertumor01", (labels == 2) * 255, "1.2.826.0.1.3680043.2.1125.12")
    _dicom_series(patient / "MASKS_DICOM" / "portalvein", np.zeros_like(labels), "1.2.826.0.1.3680043.2.1125.13")
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["ircadb-3Dircadb1.1"] and len(cases[0].labels) == 2
    image, read_labels = load_case(cases[0])
    assert np.array_equal(read_labels, labels)
    assert image.geometry.spacing == pytest.approx((2.0, 2.0, 3.0))


def test_no_cases_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="No labelled cases"):
        find_cases(tmp_path)


def test_kfold_split_is_case_level_and_deterministic():
    ids = [f"case-{i}" for i in range(20)]
    splits = [kfold_split(ids, 5, fold, validation=3, seed=7) for fold in range(5)]
    assert splits[0] == kfold_split(ids, 5, 0, validation=3, seed=7)
    tests = [set(s["test"]) for s in splits]
    assert set().union(*tests) == set(ids) and sum(len(t) for t in tests) == 20  # each case tested once
    for s in splits:
        assert not (set(s["train"]) & set(s["validation"])) and not (set(s["train"]) & set(s["test"]))
        assert len(s["validation"]) == 3 and len(s["train"]) == 13
    assert kfold_split(ids, 5, 0, 3, seed=8) != splits[0]


def test_slice_selection_prefers_tumour_and_coverage_and_keeps_some_background():
    labels = np.zeros((60, 8, 8), np.uint8)
    labels[10:40] = 1
    labels[20:24, 2:4, 2:4] = 2
    z = select_slices(labels, 25, np.random.default_rng(0))
    assert len(z) == 25 and len(set(z)) == 25
    assert set(range(20, 24)) <= set(z)  # every tumour slice (fewer than half the budget)
    outside = [k for k in z if not 10 <= k < 40]
    assert len(outside) == 5  # a fifth of the budget from slices without liver
    assert len(select_slices(labels[:10], 25, np.random.default_rng(0))) == 10


def test_tiles_follow_the_engine_preprocessing(tmp_path):
    ct, labels = _case(4)
    contract = InputContract()
    slice_set = prepare_slices("c", Image(ct, GEOMETRY), labels, contract, count=6, seed=0)
    # 2 mm pixels → 1 mm processing grid: twice as many pixels in-plane, crop a multiple of 32.
    assert slice_set.stacks.dtype == np.uint8 and slice_set.stacks.shape[1] == 3
    assert slice_set.stacks.shape[2] % 32 == 0 and slice_set.stacks.shape[3] % 32 == 0
    sampler = TileSampler([slice_set], contract, tile=32, train=True, augment=True, seed=1)
    stack, liver, tumour = sampler[0]
    assert stack.shape == (3, 32, 32) and liver.shape == tumour.shape == (1, 32, 32)
    assert np.array_equal(sampler[0][0], stack)  # deterministic for (seed, epoch, index)
    sampler.set_epoch(1)
    assert not np.array_equal(sampler[0][0], stack)
    val = TileSampler([slice_set], contract, tile=32, train=False)
    centred = [val[i][1].mean() for i in range(len(val))]
    assert max(centred) > 0.5  # validation tiles are centred on the liver
