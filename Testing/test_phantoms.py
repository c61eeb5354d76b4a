"""Synthetic CT phantoms: determinism, labels, HU levels per contrast phase, acquisition ranges, tumour
sidecar entries, cohort variety, LiTS-layout writing, and one full-size case."""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np
import pytest

from LiverTumorSegLib import phantoms
from LiverTumorSegLib.errors import OutputError
from LiverTumorSegLib.image_io import read_image
from LiverTumorSegLib.phantoms import (
    PHASES,
    TISSUES,
    TUMOUR_TYPES,
    case_seed,
    generate_phantom,
    tissue_hu_table,
    write_phantom_dataset,
)

T = phantoms.Tissue


@functools.lru_cache(maxsize=None)
def small(seed: int):
    return generate_phantom(seed, "small")


@functools.lru_cache(maxsize=None)
def case(seed: int, size: str = "full"):
    """Case parameters only (anatomy, acquisition, grid): cheap, nothing rendered."""
    return phantoms.Case(seed, size)


def seeds_with(phase: str, count: int, exclude_steatosis: bool = True) -> list[int]:
    found = []
    for seed in range(400):
        c = case(seed, "small")
        if c.phase == phase and not (exclude_steatosis and c.anat.steatosis):
            found.append(seed)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} seeds with phase {phase}")


def hu(rows: list[dict], name: str) -> float:
    return next(r["mean_hu"] for r in rows if r["tissue"] == name)


# ------------------------------------------------------------------------------------- basic contract


def test_same_seed_gives_identical_phantoms():
    a = generate_phantom(11, "small")
    b = generate_phantom(11, "small")
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.tissues, b.tissues)
    assert a.tumours == b.tumours
    assert a.meta == b.meta
    assert a.image.geometry == b.image.geometry
    c = small(12)
    assert c.image.array.shape != a.image.array.shape or not np.array_equal(c.image.array, a.image.array)


def test_a_fixed_seed_gives_the_pinned_phantom():
    """Seed 5 renders exactly these arrays: a refactoring must not change a single voxel (a deliberate change
    of the generator updates these numbers and PHANTOM_VERSION)."""
    ph = small(5)
    assert ph.image.array.shape == (58, 128, 128) and ph.image.geometry.spacing == (2.7396, 2.7396, 5.0)
    assert np.bincount(ph.label.ravel()).tolist() == [920885, 18912, 10475]
    assert [(t["type"], t["diameter_mm"], t["voxels"]) for t in ph.tumours] == [
        ("hyperdense", 78.96, 6870), ("hyperdense", 48.79, 1610), ("hyperdense", 4.47, 1), ("hypodense", 14.62, 42),
        ("hypodense", 44.43, 1284), ("hyperdense", 8.29, 6), ("hyperdense", 33.63, 668)]
    assert hashlib.sha256(ph.image.array.tobytes()).hexdigest() == (
        "5e9c7f7c51cb39770ffe26d10585e73dd543481a97ca46d2670629a51f623bb7")


def test_arrays_geometry_and_labels():
    ph = small(0)
    image, label, tissues = ph.image.array, ph.label, ph.tissues
    assert image.dtype == np.int16 and label.dtype == np.uint8 and tissues.dtype == np.uint8
    assert image.shape == label.shape == tissues.shape
    assert image.shape[1:] == (128, 128) and 30 <= image.shape[0] <= 130
    assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any()
    assert set(np.unique(tissues).tolist()) <= set(TISSUES)
    geo = ph.image.geometry
    assert geo.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    centre = geo.index_to_physical(np.array([(s - 1) / 2 for s in image.shape]))
    assert abs(centre[0]) < 1e-3 and abs(centre[1]) < 1e-3  # centre of the volume at (0, 0, z0)
    assert image.min() >= -1024 and image.max() <= 3071
    assert ph.meta["shape"] == list(image.shape) and ph.meta["spacing"] == list(geo.spacing)


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_tumour_labels_lie_inside_the_liver(seed):
    ph = small(seed)
    label, tissues = ph.label, ph.tissues
    assert np.all(tissues[label == 2] == T.TUMOUR)
    assert np.all(label[tissues == T.TUMOUR] == 2)  # every tumour voxel is labelled, none outside the liver
    assert set(np.unique(tissues[label == 1]).tolist()) <= {T.LIVER, T.VESSEL}
    # the liver label is one solid organ of plausible size (LiTS livers: about 0.8-2.8 L)
    assert 700 < ph.meta["liver_volume_ml"] < 3000


def test_liver_is_in_the_right_upper_abdomen():
    ph = small(3)
    zz, yy, xx = np.nonzero(ph.label)
    nz, ny, nx = ph.label.shape
    # patient right = low x index; most of the liver lies right of the midline
    assert np.mean(xx < nx / 2) > 0.6
    # liver above the spleen-free lower abdomen: its centroid lies in the upper half of the scan
    spleen_z = np.nonzero(ph.tissues == T.SPLEEN)[0]
    kidney_z = np.nonzero(ph.tissues == T.CORTEX)[0]
    assert zz.mean() > kidney_z.mean()
    assert spleen_z.size and np.mean(np.nonzero(ph.tissues == T.SPLEEN)[2] > nx / 2) > 0.9


# ---------------------------------------------------------------------------------------- HU levels


def test_portal_venous_hu_levels():
    rows = tissue_hu_table([small(s) for s in seeds_with("portal_venous", 2)])
    liver = hu(rows, "liver")
    assert 88 <= liver <= 135
    assert -125 <= hu(rows, "fat") <= -75
    assert 35 <= hu(rows, "muscle") <= 80
    assert hu(rows, "air") < -950 and hu(rows, "lung") < -650
    assert abs(hu(rows, "spleen") - liver) < 40  # spleen close to the liver
    assert hu(rows, "hepatic/portal vessels") > liver + 15  # enhanced veins brighter than parenchyma
    assert hu(rows, "kidney cortex") > 120 and hu(rows, "aorta") > 120
    assert hu(rows, "tumour") < liver  # most lesions are hypodense
    assert 140 <= hu(rows, "bone marrow") <= 330 and hu(rows, "bone cortical") > 250
    assert -10 <= hu(rows, "gallbladder") <= 45


def test_late_arterial_and_unenhanced_hu_levels():
    la = tissue_hu_table([small(s) for s in seeds_with("late_arterial", 2)])
    assert 55 <= hu(la, "liver") <= 110
    assert hu(la, "aorta") > 180  # arterial phase: bright aorta
    assert hu(la, "kidney cortex") > hu(la, "kidney medulla") + 30  # corticomedullary differentiation
    un = tissue_hu_table([small(s) for s in seeds_with("unenhanced", 2)])
    assert 40 <= hu(un, "liver") <= 72
    assert hu(un, "hepatic/portal vessels") < hu(un, "liver")  # unenhanced blood darker than liver
    assert hu(un, "aorta") < 70 and hu(un, "kidney cortex") < 60


def test_tissue_hu_table_rows():
    ph = small(0)
    rows = tissue_hu_table([ph])
    assert sum(r["voxels"] for r in rows) == ph.tissues.size
    for r in rows:
        assert set(r) >= {"tissue", "mean_hu", "std_hu", "voxels"}
        sel = ph.image.array[ph.tissues == r["id"]]
        assert r["mean_hu"] == pytest.approx(sel.mean(), abs=0.01)
        assert r["std_hu"] == pytest.approx(sel.std(), abs=0.01)


# ------------------------------------------------------------------------------ acquisition and cohort


def test_spacing_and_slice_ranges():
    for seed in range(60):
        full, sm = case(seed, "full").make_grid(), case(seed, "small").make_grid()
        sx, sy, sz = full.spacing
        assert sx == sy and 0.6 - 1e-6 <= sx <= 0.9 + 1e-6
        assert 1.0 - 1e-6 <= sz <= 5.0 + 1e-6
        assert full.shape[1:] == (512, 512) and 40 <= full.shape[0] <= 320
        assert 190 <= (full.shape[0] - 1) * sz <= 325  # lung bases to below the kidneys
        assert 2.3 <= sm.spacing[0] <= 3.7 and 3.0 - 1e-6 <= sm.spacing[2] <= 5.0 + 1e-6
        assert sm.shape[1:] == (128, 128) and sm.shape[0] <= 110


def test_cohort_is_varied():
    cases = [case(seed, "small") for seed in range(80)]
    phases = [c.phase for c in cases]
    assert set(phases) == set(PHASES)
    assert 0.6 <= phases.count("portal_venous") / len(phases) <= 0.9
    assert len({round(c.slice_full, 2) for c in cases}) >= 6
    assert len({round(c.pixel_full, 2) for c in cases}) >= 8
    assert {True, False} <= {c.circular for c in cases}
    assert max(c.contrast for c in cases) > 1.1 and min(c.contrast for c in cases) < 0.9
    counts = [len(small(s).tumours) for s in range(8)]
    assert 0 in counts and max(counts) >= 4
    sizes = [t["diameter_mm"] for s in range(8) for t in small(s).tumours]
    assert min(sizes) < 10 and max(sizes) > 30


def test_small_and_full_render_the_same_patient():
    c_small, c_full = case(4, "small"), case(4, "full")
    assert c_small.phase == c_full.phase and c_small.fov == c_full.fov
    assert c_small.anat.liver_target_ml == c_full.anat.liver_target_ml


# ------------------------------------------------------------------------------------------- tumours


@pytest.mark.parametrize("seed", [0, 2, 5, 7])
def test_tumour_sidecar_entries_match_the_labels(seed):
    ph = small(seed)
    geo = ph.image.geometry
    shape = np.array(ph.label.shape)
    for t in ph.tumours:
        assert t["type"] in TUMOUR_TYPES and t["shape"] in phantoms.TUMOUR_SHAPES
        assert t["margin"] in ("sharp", "blurred")
        assert set(t["touches"]) <= {"capsule", "vessel"}
        assert 3.0 <= t["diameter_mm"] <= 80.0
        vox = np.array(t["centre_voxel"])
        np.testing.assert_allclose(geo.index_to_physical(vox.astype(float)), t["centre_mm"],
                                   atol=0.5 * max(geo.spacing) + 1e-6)
        assert np.all(vox >= 0) and np.all(vox < shape)
        if t["diameter_mm"] >= 5.0:
            lo, hi = np.maximum(vox - 1, 0), vox + 2
            near = ph.label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            assert (near == 2).any(), t
            assert t["voxels"] > 0
    assert sum(t["voxels"] for t in ph.tumours) >= np.count_nonzero(ph.label == 2)
    assert ph.meta["tumour_count"] == len(ph.tumours)


def test_tumour_contrast_follows_its_kind():
    checked = 0
    for seed in range(12):
        ph = small(seed)
        liver = ph.meta["liver_hu"]
        pv = ph.meta["phase"] == "portal_venous"
        for t in ph.tumours:
            if t["diameter_mm"] < 12 or t["voxels"] < 30:
                continue  # small lesions are dominated by partial volume on the coarse grid
            checked += 1
            if t["type"] == "cystic":
                assert t["mean_hu"] < (liver + 20) / 2 + 5, t  # water-like, diluted by partial volume
            elif t["type"] in ("hypodense", "rim_enhancing", "necrotic") and pv:
                assert t["mean_hu"] < liver - 5, t
            elif t["type"] == "hyperdense" and pv:
                assert t["mean_hu"] > liver + 5, t
    assert checked >= 5


def test_tumour_kinds_and_contacts_occur():
    tumours = [t for s in range(12) for t in small(s).tumours]
    kinds = {t["type"] for t in tumours}
    assert len(kinds) >= 4
    assert any("capsule" in t["touches"] for t in tumours)
    assert any("vessel" in t["touches"] for t in tumours)
    assert {"sharp", "blurred"} <= {t["margin"] for t in tumours}


# ------------------------------------------------------------------------------------- dataset output


def test_write_dataset_in_lits_layout(tmp_path):
    out = tmp_path / "phantoms"
    paths = write_phantom_dataset(out, 2, size="small", seed=3)
    assert paths == [out / "volume-0.nii.gz", out / "volume-1.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == [
        "segmentation-0.nii.gz", "segmentation-1.nii.gz", "volume-0.json", "volume-0.nii.gz",
        "volume-1.json", "volume-1.nii.gz"]
    for i in range(2):
        ph = small(case_seed(3, i))
        volume = read_image(out / f"volume-{i}.nii.gz")
        seg = read_image(out / f"segmentation-{i}.nii.gz", kind="label map")
        assert np.array_equal(volume.array, ph.image.array)
        assert np.array_equal(seg.array, ph.label) and seg.array.dtype == np.uint8
        np.testing.assert_allclose(volume.geometry.spacing, ph.image.geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(seg.geometry.origin, ph.image.geometry.origin, atol=1e-4)
        side = json.loads((out / f"volume-{i}.json").read_text(encoding="utf-8"))
        assert side["meta"]["seed"] == case_seed(3, i) and side["case"] == i
        assert side["tumours"] == json.loads(json.dumps(ph.tumours))
    assert case_seed(3, 0) != case_seed(3, 1) and case_seed(3, 0) == case_seed(3, 0)


def test_write_dataset_refuses_to_overwrite(tmp_path):
    write_phantom_dataset(tmp_path, 1, size="small", seed=1)
    before = (tmp_path / "volume-0.nii.gz").read_bytes()
    with pytest.raises(OutputError, match="overwrite"):
        write_phantom_dataset(tmp_path, 2, size="small", seed=2)
    assert not (tmp_path / "volume-1.nii.gz").exists()  # nothing written after the refusal
    assert (tmp_path / "volume-0.nii.gz").read_bytes() == before
    write_phantom_dataset(tmp_path, 1, size="small", seed=2, overwrite=True)
    assert (tmp_path / "volume-0.nii.gz").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        generate_phantom(0, "huge")
    with pytest.raises(ValueError):
        generate_phantom(-1)


# ------------------------------------------------------------------------------------------ full size


def test_full_size_case():
    seed = next(s for s in range(100) if case(s, "full").make_grid().shape[0] <= 90)
    ph = generate_phantom(seed, "full")  # its speed is measured by scripts/benchmark_phantoms.py
    assert ph.image.array.shape[1:] == (512, 512)
    sx, sy, sz = ph.image.geometry.spacing
    assert 0.6 <= sx <= 0.9 and sx == sy
    assert (ph.label == 1).sum() * sx * sy * sz / 1000 == pytest.approx(ph.meta["liver_volume_ml"], rel=0.2)
    small_ph = small(seed)
    assert small_ph.meta["phase"] == ph.meta["phase"]
    assert abs(small_ph.meta["liver_volume_ml"] - ph.meta["liver_volume_ml"]) < 0.1 * ph.meta["liver_volume_ml"]
