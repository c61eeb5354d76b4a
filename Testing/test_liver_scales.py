"""Choosing the liver branch's inference zooms on labelled cases, with the shipped cascade and a real phantom."""

import json
import shutil

import pytest

from LiverTumorSegLib.bundle import DEFAULT_BUNDLE, load_bundle
from LiverTumorSegLib.image_io import write_image
from LiverTumorSegLib.metrics import dice
from LiverTumorSegLib.phantoms import generate_phantom
from LiverTumorSegLib.pipeline import PipelineOptions, segment
from livertumorseg_training.cli import main
from livertumorseg_training.liver_scales import apply_liver_scales, tune_liver_scales


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    phantom = generate_phantom(7, size="small")
    write_image(phantom.image, data / "volume-0.nii.gz")
    write_image(phantom.image.with_array(phantom.label), data / "segmentation-0.nii.gz")
    return data, phantom


def test_tuning_scores_the_engine_and_prefers_fewer_zooms_on_a_tie(phantom_data, tmp_path):
    data, phantom = phantom_data
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    # (1, 1) averages two identical maps: the same labels as (1,), so the tie must go to the single zoom
    tuning = tune_liver_scales(data, tmp_path / "bundle", ["lits-0"], candidates=((1.0, 1.0), (1.0,), (1.25,)),
                               log=lambda *_: None)
    rows = {tuple(row["liver_scales"]): row for row in tuning["rows"]}
    assert tuning["cases"] == ["lits-0"] and set(rows) == {(1.0, 1.0), (1.0,), (1.25,)}
    assert rows[(1.0, 1.0)]["liver_dice"] == rows[(1.0,)]["liver_dice"] > 0.5
    bundle = load_bundle(tmp_path / "bundle")
    labels = segment(phantom.image, bundle, PipelineOptions(threads=1, liver_scales=(1.25,))).labels.array
    assert rows[(1.25,)]["liver_dice"] == round(dice(labels > 0, phantom.label > 0), 4)
    assert rows[(1.25,)]["tumour_dice"] == round(dice(labels == 2, phantom.label == 2), 4)
    best = max(row["liver_dice"] for row in tuning["rows"])
    assert tuning["best"]["liver_dice"] == best
    if rows[(1.0,)]["liver_dice"] == best:
        assert tuning["best"]["liver_scales"] == [1.0]

    apply_liver_scales(tmp_path / "bundle", tuning)
    tuned = load_bundle(tmp_path / "bundle")
    assert tuned.liver_scales == tuple(tuning["best"]["liver_scales"])
    assert tuned.manifest["metrics"]["liver_scales"]["best"] == tuning["best"]
    assert tuned.manifest["metrics"]["liver_scales"]["scale_1_only"]["liver_dice"] == rows[(1.0,)]["liver_dice"]
    assert tuned.manifest["training"] == bundle.manifest["training"]  # nothing else of the manifest changed


def test_command_writes_the_tuning_and_the_bundle(phantom_data, tmp_path, capsys):
    data, _ = phantom_data
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    assert main(["tune-liver-scales", "--data", str(data), "--bundle", str(tmp_path / "bundle"), "--out",
                 str(tmp_path / "out"), "--cases", "lits-0"]) == 0
    tuning = json.loads((tmp_path / "out" / "liver_scales_tuning.json").read_text(encoding="utf-8"))
    assert len(tuning["rows"]) == 7 and tuning["data"] == str(data)
    assert load_bundle(tmp_path / "bundle").liver_scales == tuple(tuning["best"]["liver_scales"])
    assert f"liver scales on 1 cases: {tuning['best']['liver_scales']}" in capsys.readouterr().out


def test_command_refuses_cases_that_are_not_there(phantom_data, tmp_path, capsys):
    data, _ = phantom_data
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    before = (tmp_path / "bundle" / "manifest.json").read_bytes()
    assert main(["tune-liver-scales", "--data", str(data), "--bundle", str(tmp_path / "bundle"), "--out",
                 str(tmp_path / "out")]) != 0  # the bundle's validation phantoms are not in this folder
    assert "None of the cases the bundle" in (error := capsys.readouterr().err) and "records as validation is in" in error
    assert (tmp_path / "bundle" / "manifest.json").read_bytes() == before
