"""Label-bank phantoms: training CT painted on real anatomy (label maps), here on a tiny synthetic label map
written as NIfTI (a box liver with a sphere tumour, a spleen box, an aorta): the output label is the input's
liver region on the new grid, painted HU follow the drawn tissue levels, inserted lesions lie in the liver,
a seed gives the same phantom, bad input is refused, and the command writes a resumable LiTS dataset."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import Geometry, Image, write_image
from LiverTumorSegLib.phantoms import TUMOUR_TYPES, Tissue
from livertumorseg_training import cli
from livertumorseg_training.datasets import find_cases, load_case
from livertumorseg_training.label_bank import LABEL_NAMES, Structure, list_label_maps, read_label_map
from livertumorseg_training.synth_ct import SynthOptions, synthesize

SPACING = (2.0, 2.0, 3.0)  # x, y, z (mm)
LIVER_BOX = (slice(5, 25), slice(20, 55), slice(10, 40))  # z, y, x voxels: 60 x 70 x 60 mm
TUMOUR_RADIUS_MM = 9.0
EXACT = SynthOptions(size="small", deform=False, cut_probability=0.0, extra_lesions=False)


def tiny_map(liver: bool = True) -> np.ndarray:
    """(z, y, x) label map: liver box with a sphere tumour, spleen box, aorta column."""
    labels = np.zeros((30, 80, 90), np.uint8)
    if liver:
        labels[LIVER_BOX] = Structure.LIVER
        zz, yy, xx = np.meshgrid(*(np.arange(n) for n in labels.shape), indexing="ij")
        centre = [(s.start + s.stop - 1) / 2 for s in LIVER_BOX]
        r2 = ((zz - centre[0]) * SPACING[2]) ** 2 + ((yy - centre[1]) * SPACING[1]) ** 2 + ((xx - centre[2]) * SPACING[0]) ** 2
        labels[r2 <= TUMOUR_RADIUS_MM ** 2] = Structure.TUMOUR
    labels[8:20, 30:50, 60:75] = Structure.SPLEEN
    labels[:, 58:64, 45:51] = Structure.AORTA
    return labels


def write_map(path, labels: np.ndarray):
    """Written as FLARE22 writes its maps: x and y axes flipped (the reader makes them canonical)."""
    geometry = Geometry(SPACING, (120.0, 90.0, -40.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return write_image(Image(labels, geometry), path, overwrite=True)


@pytest.fixture(scope="module")
def label_map(tmp_path_factory):
    return read_label_map(write_map(tmp_path_factory.mktemp("bank") / "tiny.nii.gz", tiny_map()))


@pytest.fixture(scope="module")
def synth(label_map):
    """Phantoms of the tiny map by seed and options, each made once per module."""

    @functools.lru_cache(maxsize=None)
    def make(seed: int, options: SynthOptions = SynthOptions(size="small")):
        return synthesize(label_map, seed, options)

    return make


def nearest_on(phantom, label_map: Image, values: np.ndarray) -> np.ndarray:
    """``values`` on the map's canonical grid, sampled at the phantom's voxel centres by nearest neighbour
    (numpy index arithmetic, independent of the generator's resampling)."""
    geo, src = phantom.image.geometry, label_map.geometry
    assert np.allclose(np.asarray(src.direction_matrix), np.eye(3))
    shape = phantom.image.array.shape
    index = [np.rint((geo.origin[a] + np.arange(shape[2 - a]) * geo.spacing[a] - src.origin[a]) / src.spacing[a]).astype(int)
             for a in range(3)]
    ok = [(i >= 0) & (i < values.shape[2 - a]) for a, i in enumerate(index)]
    out = values[np.ix_(np.clip(index[2], 0, values.shape[0] - 1), np.clip(index[1], 0, values.shape[1] - 1),
                        np.clip(index[0], 0, values.shape[2] - 1))]
    return out * (ok[2][:, None, None] & ok[1][None, :, None] & ok[0][None, None, :])


# ------------------------------------------------------------------------------------------ labels


def test_output_label_is_the_input_label_remapped(label_map, synth):
    ph = synth(2, EXACT)
    expected = nearest_on(ph, label_map, np.minimum(label_map.array, 2) * (label_map.array <= Structure.TUMOUR))
    assert np.array_equal(ph.label, expected)
    voxel = float(np.prod(ph.image.geometry.spacing))
    sx, sy, sz = ph.image.geometry.spacing
    a, b, c = 60.0, 70.0, 60.0  # liver box (mm): x, y, z
    liver_ml = (ph.label >= 1).sum() * voxel
    assert abs(liver_ml - a * b * c) <= 2 * (a * b * sz + a * c * sy + b * c * sx) / 2  # one voxel layer
    tumour_in = (label_map.array == Structure.TUMOUR).sum() * float(np.prod(SPACING))
    assert abs((ph.label == 2).sum() * voxel - tumour_in) <= 4 * np.pi * TUMOUR_RADIUS_MM ** 2 * max(sx, sy, sz)
    assert 0.6 <= sz <= 5.0 and sz >= SPACING[2] / 2 and ph.image.array.shape[1:] == (128, 128)


def test_painted_hu_follows_the_drawn_levels(synth):
    """Without blur and noise, HU inside each structure is its drawn level plus zero-mean texture (and, in the
    liver, the partial volume of grown vessels), and the levels lie in their physiological ranges."""
    liver_range = {"portal_venous": (50, 140), "late_arterial": (30, 100), "unenhanced": (15, 70), "delayed": (40, 125)}
    phases = set()
    for seed in range(6):
        ph = synth(seed, SynthOptions(size="small", extra_lesions=False, reconstruct=False))
        levels, phase = ph.meta["hu_levels"], ph.meta["phase"]
        phases.add(phase)
        assert liver_range[phase][0] <= levels["liver"] <= liver_range[phase][1]
        assert -115 <= levels["fat"] <= -85 and 40 <= levels["muscle"] <= 80 and 40 <= levels["spleen"] <= 160
        for tissue, name in ((Tissue.LIVER, "liver"), (Tissue.SPLEEN, "spleen"), (Tissue.FAT, "fat")):
            values = ph.image.array[ph.tissues == tissue].astype(float)
            assert values.size > 500, name
            assert abs(np.median(values) - levels[name]) <= 10, name
            low, high = np.percentile(values, [2, 98])
            assert levels[name] - 60 <= low and high <= levels[name] + 80, name
    assert len(phases) >= 2


def test_inserted_lesions_lie_inside_the_liver(synth):
    seed = next(s for s in range(12) if synth(s).meta["inserted_tumours"] >= 1)
    with_lesions, without = synth(seed), synth(seed, SynthOptions(size="small", extra_lesions=False))
    assert np.array_equal(with_lesions.label >= 1, without.label >= 1)  # lesions change nothing but the tumour label
    new = (with_lesions.label == 2) & (without.label != 2)
    assert new.any() and np.all(without.label[new] == 1)
    inserted = [t for t in with_lesions.tumours if t["source"] == "inserted"]
    assert len(inserted) == with_lesions.meta["inserted_tumours"]
    assert all(t["type"] in TUMOUR_TYPES and t["diameter_mm"] >= 5.0 for t in inserted)
    assert sum(t["voxels"] for t in inserted) >= new.sum() * 0.5


def test_same_seed_gives_the_same_phantom(label_map, synth):
    a = synthesize(label_map, 5, SynthOptions(size="small"))
    b = synth(5)
    assert np.array_equal(a.image.array, b.image.array) and np.array_equal(a.label, b.label)
    assert a.meta == b.meta and a.image.geometry == b.image.geometry
    c = synth(6)
    assert c.image.array.shape != a.image.array.shape or not np.array_equal(c.image.array, a.image.array)


def test_a_map_without_liver_is_refused(tmp_path):
    path = write_map(tmp_path / "no_liver.nii.gz", tiny_map(liver=False))
    with pytest.raises(InputError, match="no liver"):
        read_label_map(path)


# ------------------------------------------------------------------------------------ the command


@pytest.fixture
def bank(tmp_path):
    root = tmp_path / "bank"
    cases = ["flare22/tiny_a", "flare22/tiny_b", "ircad/ircad01"]
    for case in cases:
        (root / case).parent.mkdir(parents=True, exist_ok=True)
        write_map(root / f"{case}.nii.gz", tiny_map())
    labels = {"0": "background", **{str(k): v for k, v in LABEL_NAMES.items()}}
    (root / "labels.json").write_text(json.dumps({"labels": labels, "cases": cases}))
    return root


def test_the_validation_patient_is_never_listed(bank):
    assert [e.case_id for e in list_label_maps(bank)] == ["flare22/tiny_a", "flare22/tiny_b"]
    with pytest.raises(InputError, match="no label maps"):
        list_label_maps(bank, ["ircad"])


def test_command_writes_a_resumable_lits_dataset(bank, tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["synth-phantoms", "--label-bank", str(bank), "--out", str(out), "--seed", "3", "--size", "small"]
    assert cli.main(args + ["--count", "2"]) == 0
    cases = find_cases(out)
    assert [c.case_id for c in cases] == ["lits-0", "lits-1"] and {c.layout for c in cases} == {"lits"}
    image, labels = load_case(cases[0])
    assert image.array.dtype == np.int16 and set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).any()
    side = json.loads((out / "volume-1.json").read_text())
    assert side["label_map"] in ("flare22/tiny_a", "flare22/tiny_b") and side["case"] == 1
    first = (out / "volume-0.nii.gz").stat().st_mtime_ns
    assert cli.main(args + ["--count", "3"]) == 0  # resumes: case 0 and 1 kept, case 2 added
    assert (out / "volume-0.nii.gz").stat().st_mtime_ns == first and (out / "volume-2.json").is_file()
    assert "case 0: complete, kept" in capsys.readouterr().out
    assert cli.main(args[:-4] + ["--seed", "4", "--size", "small", "--count", "4"]) == 3  # other settings: refused
    assert not (out / "volume-3.nii.gz").exists()
    (out / "notes.txt").write_text("mine")
    assert cli.main(args + ["--count", "4"]) == 3
    assert "holds other files" in capsys.readouterr().err


def test_command_refuses_bad_input_and_writes_nothing(bank, tmp_path, capsys):
    for name in ("tiny_a", "tiny_b"):
        write_map(bank / "flare22" / f"{name}.nii.gz", tiny_map(liver=False))
    out = tmp_path / "synth"
    code = cli.main(["synth-phantoms", "--label-bank", str(bank), "--out", str(out), "--count", "2", "--seed", "1",
                     "--size", "small", "--sources", "flare22"])
    assert code == 2 and "no liver" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["synth-phantoms", "--label-bank", str(bank), "--out", str(out), "--count", "1",
                     "--sources", "flare22,elsewhere"]) == 64
    assert cli.main(["synth-phantoms", "--label-bank", str(tmp_path), "--out", str(out), "--count", "1"]) == 2
