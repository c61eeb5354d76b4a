"""Resection planning: volumes, FLR verdicts and tumour margins with exact answers, and the `plan` command.

Synthetic box livers with sphere tumours on small grids; planes lie on voxel faces, so voxel-centre
assignment gives the analytic volumes. Real SimpleITK files for the command line.
"""

import base64
import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorSegLib.cli import main
from LiverTumorSegLib.errors import InputError
from LiverTumorSegLib.image_io import Geometry, Image, read_image, write_image
from LiverTumorSegLib.resection import Plane, margin_flag, plan_resection
from LiverTumorSegLib.volumetry import measure

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _rotation(axis, degrees) -> np.ndarray:
    rotation = sitk.VersorTransform(tuple(float(a) for a in axis), np.radians(degrees))
    return np.asarray(rotation.GetMatrix()).reshape(3, 3)


def _moved(geometry, plane, rotation, origin):
    """The same patient moved rigidly, x → origin + R (x − old origin): the rotated grid and the moved plane."""
    moved = Geometry(geometry.spacing, tuple(origin), tuple(np.asarray(rotation).ravel()))
    point = origin + rotation @ (np.asarray(plane.point) - geometry.origin)
    return moved, Plane.from_values([*point, *(rotation @ plane.normal)])


def _box_liver(shape, box=(slice(2, -2),) * 3) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[box] = 1
    return labels


def _add_sphere(labels, geometry, centre_lps, radius_mm) -> None:
    """Label 2 on the voxels whose centre lies within ``radius_mm`` of ``centre_lps``."""
    index = np.stack(np.meshgrid(*map(np.arange, labels.shape), indexing="ij"), axis=-1)
    inside = np.linalg.norm(geometry.index_to_physical(index) - centre_lps, axis=-1) <= radius_mm
    labels[inside] = 2


def _face(geometry, axis_zyx, index) -> float:
    """LPS coordinate along a grid axis (identity direction) of the face between voxel ``index`` and the next."""
    xyz = 2 - axis_zyx
    return geometry.origin[xyz] + (index + 0.5) * geometry.spacing[xyz]


@pytest.mark.parametrize("axis, normal_sign, face", [(0, 1, 7), (0, -1, 12), (2, 1, 9), (2, -1, 4)])
def test_axial_and_sagittal_planes_split_a_box_exactly(axis, normal_sign, face):
    geometry = Geometry((1.2, 0.8, 2.0), (10.0, -20.0, 5.0), IDENTITY)
    labels = _box_liver((20, 16, 24))  # liver voxels 2..17, 2..13, 2..21 along z, y, x
    cut = _face(geometry, axis, face)
    normal = np.zeros(3)
    normal[2 - axis] = normal_sign
    plan = plan_resection(labels, geometry, plane=Plane.from_values([*(cut if i == 2 - axis else 0.0 for i in range(3)),
                                                                      *normal]))
    first, last = 2 - 0.5, labels.shape[axis] - 3 + 0.5  # the liver's faces in voxel units along the cut axis
    spacing = geometry.spacing[2 - axis]
    low, high = (face + 0.5 - first) * spacing, (last - face - 0.5) * spacing  # mm below and above the cut
    area_ml = 12 * 0.8 * (20 * 1.2 if axis == 0 else 16 * 2.0) / 1000
    resected_ml = (high if normal_sign > 0 else low) * area_ml
    remnant_ml = (low if normal_sign > 0 else high) * area_ml
    result = plan.result
    assert result["resected_volume_ml"] == pytest.approx(resected_ml, rel=0.005)
    assert result["remnant_volume_ml"] == pytest.approx(remnant_ml, rel=0.005)
    assert result["flr_percent"] == pytest.approx(100 * remnant_ml / (resected_ml + remnant_ml), rel=0.005)
    assert result["tumours"] == []
    assert np.count_nonzero(plan.resected_liver) * geometry.voxel_volume_mm3 / 1000 == pytest.approx(resected_ml)


def _tumour_case(spacing=(1.0, 1.0, 1.0), shape=(40, 40, 40)):
    """A box liver cut by an axial plane on a voxel face; three spheres at known distances from it."""
    geometry = Geometry(spacing, (-30.0, 15.0, 100.0), IDENTITY)
    labels = _box_liver(shape)
    cut = _face(geometry, 0, shape[0] // 2 - 1)
    centre_xy = [geometry.origin[i] + (shape[2 - i] - 1) / 2 * spacing[i] for i in (0, 1)]
    spheres = [(cut - 13.0, 4.0), (cut + 1.0, 3.0), (cut + 6.5, 3.0)]  # remnant 9 mm away, crossing, resected 3.5 mm
    for k, (z, radius) in enumerate(spheres):
        _add_sphere(labels, geometry, np.array([centre_xy[0] + (k - 1) * 9.0, centre_xy[1], z]), radius)
    return labels, geometry, Plane.from_values([0.0, 0.0, cut, 0.0, 0.0, 2.0]), spheres


def test_sphere_margins_sides_and_flags():
    labels, geometry, plane, spheres = _tumour_case()
    tumours = plan_resection(labels, geometry, plane=plane).result["tumours"]
    by_side = {t["resected"]: t for t in tumours}
    assert sorted(by_side) == ["fully", "not", "partly"] and [t["id"] for t in tumours] == [1, 2, 3]
    diagonal = float(np.linalg.norm(geometry.spacing))
    assert abs(by_side["not"]["margin_mm"] - 9.0) <= diagonal and by_side["not"]["margin_flag"] == "close"
    assert by_side["partly"]["margin_mm"] == 0 and by_side["partly"]["margin_flag"] == "crosses"
    assert 0 < by_side["partly"]["resected_volume_ml"] < by_side["partly"]["volume_ml"]
    assert abs(by_side["fully"]["margin_mm"] - 3.5) <= diagonal and by_side["fully"]["margin_flag"] == "close"
    assert by_side["fully"]["resected_volume_ml"] == by_side["fully"]["volume_ml"]
    assert by_side["not"]["centroid_lps_mm"][2] == pytest.approx(spheres[0][0], abs=0.01)
    assert [margin_flag(m, False) for m in (0.0, 0.99, 1.0, 9.99, 10.0)] == ["R1 risk", "R1 risk", "close", "close", None]
    assert margin_flag(0.0, True) == "crosses"


def test_anisotropic_grid_volumes_and_margin():
    geometry = Geometry((0.7, 0.9, 2.5), (0.0, 0.0, 0.0), IDENTITY)
    labels = _box_liver((16, 40, 50))  # liver 46 × 36 × 12 voxels
    cut = _face(geometry, 2, 29)  # sagittal, 28 liver columns on the low-x side
    _add_sphere(labels, geometry, np.array([cut - 12.0, 18.0, 19.0]), 5.0)
    result = plan_resection(labels, geometry, plane=Plane.from_values([cut, 0, 0, -1, 0, 0])).result
    voxel_ml = 0.7 * 0.9 * 2.5 / 1000
    assert result["resected_volume_ml"] == pytest.approx(28 * 36 * 12 * voxel_ml, rel=0.005)
    assert result["remnant_volume_ml"] == pytest.approx(18 * 36 * 12 * voxel_ml, rel=0.005)
    (tumour,) = result["tumours"]
    assert tumour["resected"] == "fully"
    assert abs(tumour["margin_mm"] - 7.0) <= np.linalg.norm(geometry.spacing) and tumour["margin_flag"] == "close"


def test_oblique_grid_matches_the_unrotated_case():
    labels, geometry, plane, _ = _tumour_case(spacing=(0.9, 1.1, 1.6), shape=(36, 30, 34))
    rotation, origin = _rotation((1.0, 2.0, 3.0), 35.0), np.array([12.0, -40.0, 7.0])
    rotated, moved = _moved(geometry, plane, rotation, origin)
    for straight, oblique in [(plan_resection(labels, geometry, plane=plane), plan_resection(labels, rotated, plane=moved)),
                              (plan_resection(labels, geometry, resected=_upper(labels)),
                               plan_resection(labels, rotated, resected=_upper(labels)))]:
        a, b = straight.result, oblique.result
        assert np.array_equal(straight.resected_liver, oblique.resected_liver)
        assert b["resected_volume_ml"] == pytest.approx(a["resected_volume_ml"], rel=1e-12)
        assert b["flr_percent"] == pytest.approx(a["flr_percent"], rel=1e-12)
        for t, u in zip(a["tumours"], b["tumours"], strict=True):
            assert (u["id"], u["resected"], u["margin_flag"]) == (t["id"], t["resected"], t["margin_flag"])
            assert u["margin_mm"] == pytest.approx(t["margin_mm"], abs=1e-9)
            assert u["centroid_lps_mm"] == pytest.approx(list(origin + rotation @ (np.asarray(t["centroid_lps_mm"]) -
                                                                                     geometry.origin)), abs=1e-9)


def _upper(labels) -> np.ndarray:
    """The half-space mask of :func:`_tumour_case`'s plane: slices above the middle face."""
    mask = np.zeros(labels.shape, np.uint8)
    mask[labels.shape[0] // 2:] = 1
    return mask


def test_mask_resection_equals_the_plane_resection():
    labels, geometry, plane, _ = _tumour_case(spacing=(0.8, 0.8, 1.5))
    mask = _upper(labels)
    mask[:, :1] = 1  # mask voxels outside the liver are ignored
    by_plane = plan_resection(labels, geometry, plane=plane).result
    by_mask = plan_resection(labels, geometry, resected=mask).result
    for key in ("resected_volume_ml", "remnant_volume_ml", "functional_remnant_volume_ml", "flr_percent", "verdict"):
        assert by_mask[key] == by_plane[key], key
    assert by_mask["resection"] == {"type": "mask"}
    for t, u in zip(by_plane["tumours"], by_mask["tumours"], strict=True):
        assert (u["resected"], u["margin_flag"], u["volume_ml"]) == (t["resected"], t["margin_flag"], t["volume_ml"])
        assert u["margin_mm"] == pytest.approx(t["margin_mm"], abs=1e-9)


def test_flr_verdict_presets_and_functional_volume():
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    labels = _box_liver((24, 14, 14))  # 20 liver slices (z = 2..21) of 10 × 10 voxels
    plane = Plane.from_values([0, 0, 6.5, 0, 0, 1])  # keeps z = 2..6: 5 slices, FLR 25 %
    verdicts = {state: plan_resection(labels, geometry, plane=plane, liver_state=state).result
                for state in ("normal", "chemotherapy", "cirrhosis")}
    assert {s: (r["flr_percent"], r["threshold_percent"], r["verdict"]) for s, r in verdicts.items()} == {
        "normal": (25.0, 20.0, "pass"), "chemotherapy": (25.0, 30.0, "fail"), "cirrhosis": (25.0, 40.0, "fail")}
    labels[3:5, 4:9, 4:9] = 2  # 50 tumour voxels in the remnant, not functional
    result = plan_resection(labels, geometry, plane=plane).result
    assert result["remnant_volume_ml"] == pytest.approx(0.5)
    assert result["functional_remnant_volume_ml"] == pytest.approx(0.45)
    assert result["flr_percent"] == pytest.approx(100 * 450 / 1950)
    with pytest.raises(InputError, match="liver state"):
        plan_resection(labels, geometry, plane=plane, liver_state="steatosis")


def test_tumours_are_numbered_as_volumetry_numbers_lesions():
    geometry = Geometry((0.8, 0.9, 2.0), (5.0, 6.0, 7.0), tuple(_rotation((0, 0, 1), 20).ravel()))
    labels = _box_liver((12, 30, 30))
    labels[3:5, 4:7, 4:7] = labels[3:5, 20:23, 20:23] = 2  # a tie: array order decides
    labels[6:9, 10:15, 4:8] = 2
    labels[7, 25, 25] = labels[8, 26, 26] = 2  # diagonal neighbours: one 26-connected tumour
    lesions = measure(labels, np.zeros(labels.shape, np.float32), geometry)["lesions"]
    tumours = plan_resection(labels, geometry, plane=Plane.from_values([0, 0, 16.0, 0, 0, 1])).result["tumours"]
    assert [t["id"] for t in tumours] == [lesion["id"] for lesion in lesions] == [1, 2, 3, 4]
    for tumour, lesion in zip(tumours, lesions):
        assert tumour["volume_ml"] == pytest.approx(lesion["volume_ml"])
        assert tumour["centroid_lps_mm"] == pytest.approx(lesion["centroid_lps_mm"])


def test_bad_inputs_raise_clear_errors():
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    labels = _box_liver((10, 10, 10))  # liver from 1.5 to 7.5 mm on each axis
    with pytest.raises(InputError, match=r"misses the liver: .* remnant side \(resected volume 0 mL\)"):
        plan_resection(labels, geometry, plane=Plane.from_values([0, 0, 20, 0, 0, 1]))
    with pytest.raises(InputError, match=r"resected side \(remnant volume 0 mL\).*flip the normal"):
        plan_resection(labels, geometry, plane=Plane.from_values([0, 0, 20, 0, 0, -1]))
    with pytest.raises(InputError, match="resected mask misses the liver"):
        plan_resection(labels, geometry, resected=np.zeros_like(labels))
    with pytest.raises(InputError, match="no liver"):
        plan_resection(np.zeros_like(labels), geometry, plane=Plane.from_values([0, 0, 4, 0, 0, 1]))
    with pytest.raises(InputError, match="normal .* is zero"):
        Plane.from_values([1, 2, 3, 0, 0, 0])
    with pytest.raises(InputError, match="six comma-separated numbers"):
        Plane.parse("1,2,3,a,0,1")
    with pytest.raises(InputError, match=r"mask has shape \(10, 10, 9\)"):
        plan_resection(labels, geometry, resected=np.ones((9, 10, 10)))
    labels[5, 5, 5] = 3
    with pytest.raises(InputError, match="other than 0 .*: 3"):
        plan_resection(labels, geometry, plane=Plane.from_values([0, 0, 4, 0, 0, 1]))
    labels[labels > 0] = 2
    with pytest.raises(InputError, match="no functional liver"):
        plan_resection(labels, geometry, plane=Plane.from_values([0, 0, 4, 0, 0, 1]))


# ------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The tumour case on an oblique grid, written as label map and half-space mask files."""
    labels, geometry, plane, _ = _tumour_case(spacing=(1.0, 1.0, 1.5), shape=(30, 30, 30))
    geometry, plane = _moved(geometry, plane, _rotation((0.0, 1.0, 1.0), 25.0), np.array([-80.0, 60.0, -300.0]))
    folder = tmp_path_factory.mktemp("study")
    seg = write_image(Image(labels, geometry), folder / "segmentation.nii.gz")
    mask = write_image(Image(_upper(labels), geometry), folder / "resected.nii.gz")
    return seg, mask, plane


def _plan(args, capsys):
    code = main(["plan", *map(str, args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured


def test_cli_writes_plan_json_csv_html(case, tmp_path, capsys):
    seg, mask, plane = case
    out = tmp_path / "plan"
    text = ",".join(map(repr, (*plane.point, *plane.normal)))
    code, captured = _plan([seg, f"--plane={text}", "--liver-state", "cirrhosis", "-o", out], capsys)
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["plan.csv", "plan.html", "plan.json"]
    document = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert document["producer"] == "LiverTumorSeg" and document["inputs"]["segmentation"] == str(seg)
    assert document["resection"]["type"] == "plane" and document["liver_state"] == "cirrhosis"
    labels = read_image(seg, kind="label map")
    expected = plan_resection(labels.array, labels.geometry, plane=plane, liver_state="cirrhosis").result
    assert {key: document[key] for key in expected} == json.loads(json.dumps(expected))
    assert document["threshold_percent"] == 40.0 and len(document["tumours"]) == 3
    assert f"FLR {document['flr_percent']:.1f} %" in captured.out and f"outputs: {out}" in captured.out
    rows = list(csv.DictReader((out / "plan.csv").open(encoding="utf-8")))
    assert [r["structure"] for r in rows] == ["plan", "tumour", "tumour", "tumour"]
    assert float(rows[0]["flr_percent"]) == document["flr_percent"] and rows[0]["verdict"] == document["verdict"]
    assert [r["margin_flag"] for r in rows[1:]] == [t["margin_flag"] or "" for t in document["tumours"]]
    page = (out / "plan.html").read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(png).startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    assert "crosses" in page and "40 %" in page

    by_mask = tmp_path / "by-mask"
    code, _ = _plan([seg, "--resected", mask, "--liver-state", "cirrhosis", "-o", by_mask], capsys)
    assert code == 0
    mask_document = json.loads((by_mask / "plan.json").read_text(encoding="utf-8"))
    assert mask_document["flr_percent"] == document["flr_percent"] and mask_document["resection"] == {"type": "mask"}


def test_cli_refuses_existing_and_foreign_output_folders(case, tmp_path, capsys):
    seg, _, plane = case
    out = tmp_path / "plan"
    text = ",".join(map(repr, (*plane.point, *plane.normal)))
    assert _plan([seg, f"--plane={text}", "-o", out], capsys)[0] == 0
    code, captured = _plan([seg, f"--plane={text}", "-o", out], capsys)
    assert code == 3 and "already exists" in captured.err
    assert _plan([seg, f"--plane={text}", "-o", out, "--overwrite"], capsys)[0] == 0
    (out / "notes.txt").write_text("the user's notes")
    code, captured = _plan([seg, f"--plane={text}", "-o", out, "--overwrite"], capsys)
    assert code == 3 and "notes.txt" in captured.err and (out / "notes.txt").exists()
    code, captured = _plan([seg, f"--plane={text}", "-o", seg.parent, "--overwrite"], capsys)
    assert code == 3 and seg.exists()


def test_cli_overwrite_below_but_never_of_the_current_folder(case, tmp_path, capsys, monkeypatch):
    seg, _, plane = case
    text = ",".join(map(repr, (*plane.point, *plane.normal)))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _plan([seg, f"--plane={text}", "-o", "plan", "--overwrite"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path / "plan")
    code, captured = _plan([seg, f"--plane={text}", "-o", ".", "--overwrite"], capsys)
    assert code == 3 and "current folder" in captured.err and (tmp_path / "plan" / "plan.json").exists()


def test_cli_input_errors_exit_2_and_write_nothing(case, tmp_path, capsys):
    seg, mask, plane = case
    out = tmp_path / "plan"
    code, captured = _plan([seg, "--plane=0,0,1e4,0,0,1", "-o", out], capsys)
    assert code == 2 and "misses the liver" in captured.err
    other = tmp_path / "shifted.nii.gz"
    shifted = sitk.ReadImage(str(mask))
    shifted.SetOrigin(tuple(np.asarray(shifted.GetOrigin()) + 5.0))
    sitk.WriteImage(shifted, str(other))
    code, captured = _plan([seg, "--resected", other, "-o", out], capsys)
    assert code == 2 and "another spacing, origin or direction" in captured.err
    code, captured = _plan([seg, "--plane=1,2,3,0,0,0", "-o", out], capsys)
    assert code == 2 and "normal" in captured.err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["shifted.nii.gz"]
