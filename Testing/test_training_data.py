"""Training data: dataset layouts (files written in each layout), splits, slice choice and tiles."""

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import Geometry, Image, write_image
from LiverTumorSegLib.preprocess import InputContract
from livertumorseg_training.datasets import find_cases, find_cases_in, kfold_split, load_case
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


def _lits_folder(folder, numbers):
    for n in numbers:
        ct, labels = _case(n)
        write_image(Image(ct, GEOMETRY), folder / f"volume-{n}.nii.gz")
        write_image(Image(labels, GEOMETRY), folder / f"segmentation-{n}.nii.gz")
    return folder


def test_several_training_folders_keep_their_cases_apart(tmp_path):
    procedural = _lits_folder(tmp_path / "procedural", (0, 1))
    anatomy = _lits_folder(tmp_path / "anatomy", (0,))
    assert list(find_cases_in([procedural])) == ["lits-0", "lits-1"]
    cases = find_cases_in([procedural, anatomy])
    assert sorted(cases) == ["anatomy/lits-0", "procedural/lits-0", "procedural/lits-1"]
    assert cases["anatomy/lits-0"].image == anatomy / "volume-0.nii.gz"
    with pytest.raises(InputError, match="different names"):
        find_cases_in([procedural, tmp_path / "other" / "procedural"])


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


def _windowed_scans(folder, names=("scan0", "scan1", "scan2"), with_index=True):
    """Real-train layout: uint8 NAME_ct.nii.gz (grey values, not HU) + NAME_label.nii.gz, and cases.json."""
    folder.mkdir(exist_ok=True)
    for n, name in enumerate(names):
        ct, labels = _case(n)
        grey = np.clip(np.rint((ct.astype(float) + 170) * 255 / 460), 0, 255).astype(np.uint8)
        write_image(Image(grey, GEOMETRY), folder / f"{name}_ct.nii.gz")
        write_image(Image(labels, GEOMETRY), folder / f"{name}_label.nii.gz")
    if with_index:
        (folder / "cases.json").write_text("[]")
    return folder


def test_windowed_8bit_layout_maps_grey_values_through_the_estimated_window(tmp_path):
    cases = find_cases(_windowed_scans(tmp_path / "real"))
    assert [(c.case_id, c.layout, c.grey_window) for c in cases] == [
        (name, "windowed-8bit", (-170.0, 290.0)) for name in ("scan0", "scan1", "scan2")]
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].image)))
    image, labels = load_case(cases[0])
    # grey = 255 · (HU + 170) / 460, inverted exactly; 0 and 255 stay at the window's edges
    np.testing.assert_allclose(image.array, -170 + grey.astype(float) * 460 / 255, atol=1e-4)
    assert image.array.min() == -170 and image.array.max() <= 290 and set(np.unique(labels)) == {0, 1, 2}


def test_paired_layout_without_cases_json_is_hu(tmp_path):
    folder = _windowed_scans(tmp_path / "paired", names=("a",), with_index=False)
    (folder / "a_label.nii.gz").rename(folder / "a_lits_label.nii.gz")
    [case] = find_cases(folder)
    assert (case.case_id, case.layout, case.grey_window) == ("a", "paired", None)


def test_windowed_scan_with_values_beyond_8_bits_is_refused(tmp_path):
    folder = _windowed_scans(tmp_path / "real", names=("a",))
    write_image(Image(np.full((12, 40, 48), 300, np.int16), GEOMETRY), folder / "a_ct.nii.gz", overwrite=True)
    with pytest.raises(InputError, match="outside 0–255"):
        load_case(find_cases(folder)[0])


def _grey_slice_set(grey_value, labels):
    from livertumorseg_training.slices import SliceSet

    stacks = np.full((1, 3) + labels.shape, grey_value, np.uint8)
    stacks[:, :, 0, 0] = 255  # one saturated voxel (bone or contrast: only "≥ the window's top" is known)
    return SliceSet("real", stacks, labels[None], np.array([[s / 2 for s in labels.shape]]), (-170.0, 290.0))


def test_validation_tiles_of_an_8bit_scan_use_the_estimated_window():
    labels = np.zeros((64, 64), np.uint8)
    sampler = TileSampler([_grey_slice_set(155, labels)], InputContract(), tile=64, train=False)
    stack, _, _ = sampler[0]
    # grey 155 → −170 + 155·460/255 = 109.6 HU → (109.6 + 100) · 255/500 = 106.9 → 107 in the contract's window
    assert stack[1, 32, 32] == 107
    assert stack[1, 0, 0] == 199  # grey 255 → 290 HU, the estimate's top, not extrapolated


def test_training_tiles_of_an_8bit_scan_redraw_the_window():
    labels = np.zeros((64, 64), np.uint8)
    sampler = TileSampler([_grey_slice_set(155, labels)], InputContract(), tile=64, train=True, augment=True, seed=1)
    values = []
    for epoch in range(40):
        sampler.set_epoch(epoch)
        stack, _, _ = sampler[0]
        values.append(stack[1, 32, 32])
    # lower edge −200…−140 HU and width 380…520 HU: grey 155 lies between 31 and 176 HU → 67…141 after windowing
    assert 67 <= min(values) and max(values) <= 141 and len(set(values)) > 10


def test_scale_augmentation_zooms_the_tile_content():
    """A disk of radius 10 px: its area in the tile follows 1/scale², scale in 0.8…1.25; labels stay 0/1/2."""
    labels = np.zeros((160, 160), np.uint8)
    yy, xx = np.mgrid[:160, :160]
    labels[(yy - 80) ** 2 + (xx - 80) ** 2 <= 100] = 1
    sampler = TileSampler([_grey_slice_set(155, labels)], InputContract(), tile=64, train=True, augment=True,
                          liver_centred=1.0, seed=2)
    areas = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        _, liver, tumour = sampler[0]
        assert set(np.unique(liver)) <= {0.0, 1.0} and tumour.sum() == 0
        areas.append(liver.sum())
    disk = np.pi * 100
    assert min(areas) >= 0.9 * disk / 1.25**2 and max(areas) <= 1.1 * disk / 0.8**2
    assert max(areas) / min(areas) > 1.6  # the scale really varies (1.25² / 0.8² = 2.4 at the extremes)


def test_a_coarse_liver_branch_gets_a_window_liver_scale_times_the_tile_and_the_tumour_its_centre():
    """liver_scale 2, tile 32: a 64 px window centred on the liver; the tumour target is its central 32 px."""
    labels = np.zeros((96, 96), np.uint8)
    labels[30:70, 20:60] = 1  # liver centre (49.5, 39.5)
    labels[44:50, 36:42] = 2  # tumour inside it
    labels[4:8, 4:8] = 2  # a second "tumour" outside the window's centre tile
    sampler = TileSampler([_grey_slice_set(155, labels)], InputContract(), tile=32, train=False, liver_scale=2)
    sampler.sets[0].centres[:] = [48, 40]
    stack, liver, tumour = sampler[0]
    assert stack.shape == (3, 64, 64) and liver.shape == (1, 64, 64) and tumour.shape == (1, 32, 32)
    np.testing.assert_array_equal(liver[0], labels[16:80, 8:72] >= 1)  # window rows 48−32…48+32, cols 40−32…40+32
    np.testing.assert_array_equal(tumour[0], labels[32:64, 24:56] == 2)  # its centre 32 px: the inner tumour only
    assert tumour.sum() == 36


def test_a_bundle_trained_on_several_folders_gives_each_folder_its_own_cases():
    from livertumorseg_training.datasets import bundle_cases_in

    recorded = ["procedural/lits-0", "anatomy/lits-0", "procedural/lits-7"]
    assert bundle_cases_in(recorded, "runs/procedural") == ["lits-0", "lits-7"]
    assert bundle_cases_in(recorded, "runs/anatomy/") == ["lits-0"]
    assert bundle_cases_in(recorded, "runs/other") == []
    assert bundle_cases_in(["lits-0", "lits-3"], "runs/procedural") == ["lits-0", "lits-3"]  # one-folder bundles


def test_recorded_case_ids_name_the_folder_each_case_came_from():
    from livertumorseg_training.datasets import recorded_case_ids

    split = {"train": ["lits-0", "lits-3"], "validation": ["lits-5"], "real_train": ["mahler00"], "real_holdout": ["mahler06"]}
    one_folder = {"data": "phantoms-train", "config": {"real_data": "../shared/data/real-train"}, "split": split}
    assert recorded_case_ids(one_folder, ("train", "real_train")) == [
        "phantoms-train/lits-0", "phantoms-train/lits-3", "real-train/mahler00"]
    several = {"data": "phantoms-train, synth-train", "config": {}, "split": {"train": ["synth-train/lits-1"], "real_train": ["x"]}}
    assert recorded_case_ids(several, ("train", "real_train")) == ["synth-train/lits-1", "x"]  # real folder unknown
    assert recorded_case_ids({"split": split}, ("validation",)) == ["lits-5"]  # an older manifest: bare ids
