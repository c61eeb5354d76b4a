"""The seed baselines end to end: train a few steps on small phantoms, export a bundle, segment with the engine."""

import json

import numpy as np
import pytest

from LiverTumorSegLib.baseline_networks import normalise, resize
from LiverTumorSegLib.bundle import load_bundle, write_bundle
from LiverTumorSegLib.errors import BundleError
from LiverTumorSegLib.image_io import read_image
from LiverTumorSegLib.phantoms import write_phantom_dataset
from LiverTumorSegLib.pipeline import segment
from livertumorseg_training.baseline_training import BaselineConfig, train_baseline
from livertumorseg_training.cli import main as train_cli
from livertumorseg_training.export import ONNX_TOLERANCE, export_bundle
from livertumorseg_training.networks import build_model

KINDS = {"unet3d": "volume_resized", "hdenseunet": "slab_2_5d", "e2net": "slice_2d"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, count=3, size="small", seed=5)
    return root


@pytest.fixture(scope="module")
def bundles(phantoms, tmp_path_factory):
    """Each baseline trained one step per phase and exported (module scope: shared by the tests below)."""
    out = {}
    for model in KINDS:
        folder = tmp_path_factory.mktemp(model)
        config = BaselineConfig(model=model, data=str(phantoms), out=str(folder / "run"), validation_cases=1, epochs=1,
                                steps_per_epoch=1, validation_batches=1, seed=1)
        checkpoint = train_baseline(config, log=lambda *args: None)
        out[model] = export_bundle(checkpoint, folder / "bundle", name=f"{model}-test", version="0")
    return out


@pytest.mark.parametrize("model", list(KINDS))
def test_trained_baseline_exports_and_segments(model, bundles, phantoms):
    bundle = bundles[model]
    assert bundle.kind == KINDS[model]
    assert all(value < ONNX_TOLERANCE for value in bundle.manifest["onnx_max_abs_difference"].values())
    history = [json.loads(line) for line in (bundle.path.parent / "run" / "history.jsonl").read_text().splitlines()]
    assert history and all(np.isfinite(h["validation_loss"]) for h in history)
    split = bundle.manifest["training"]["split"]
    assert len(split["validation"]) == 1 and len(split["train"]) == 2

    image = read_image(phantoms / "volume-0.nii.gz")
    result = segment(image, bundle)
    labels = result.labels.array
    assert labels.shape == image.array.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= ({0, 1} if model == "unet3d" else {0, 1, 2})  # 3D U-Net: liver only, as published
    assert result.details["stages"]["network"] == f"run ({KINDS[model]})"
    assert result.details["stages"]["radiomics filter"].startswith("not applicable")
    assert result.volumetry["liver_volume_ml"] >= 0


def test_baseline_bundle_with_incomplete_contract_is_refused(bundles, tmp_path):
    bundle = bundles["e2net"]
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version", "files")}
    manifest["input"] = {k: v for k, v in manifest["input"].items() if k != "box_margin_px"}
    files = {name: bundle.path / name for name in bundle.manifest["files"]}
    with pytest.raises(BundleError, match="box_margin_px"):
        write_bundle(tmp_path / "broken", manifest, files)
    assert not (tmp_path / "broken").exists()


def test_train_command_trains_a_baseline(phantoms, tmp_path, capsys):
    code = train_cli(["train", "--model", "unet3d", "--data", str(phantoms), "--out", str(tmp_path / "run"),
                      "--folds", "1", "--validation-cases", "1", "--epochs", "1", "--max-steps-per-epoch", "1"])
    assert code == 0 and (tmp_path / "run" / "best.pt").is_file()
    assert train_cli(["export", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "b")]) == 0
    assert load_bundle(tmp_path / "b").kind == "volume_resized"


@pytest.mark.parametrize("model,low,high", [("unet3d", 0.0, 1.0), ("e2net", -1.0, 1.0), ("hdenseunet", -248.0, 202.0)])
def test_normalise_maps_the_published_window(model, low, high):
    contract = build_model(model, "lite").input_contract
    window = contract["hu_window"]
    x = normalise(np.array([window[0] - 500, window[0], window[1], window[1] + 500], np.float32), contract)
    np.testing.assert_allclose(x, [low, low, high, high], atol=1e-5)


def test_resize_gives_the_exact_shape_and_keeps_constants():
    array = np.full((7, 33, 45), 3.5, np.float32)
    for shape in ((48, 96, 96), (5, 20, 19)):
        out = resize(array, shape, order=1)
        assert out.shape == shape
        np.testing.assert_allclose(out, 3.5, rtol=1e-6)
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:8, 2:8, 2:8] = 2
    assert set(np.unique(resize(labels, (20, 5, 13), order=0))) == {0, 2}


def test_evaluation_compares_baselines_with_the_cascade(bundles, phantoms, tmp_path):
    from livertumorseg_training.evaluation import EvaluationConfig, evaluate

    config = EvaluationConfig(
        bundles=[("proposed", load_bundle().path)] + [(model, bundles[model].path) for model in KINDS],
        data=phantoms, out=tmp_path / "results", cases=["lits-0"], ablation=False, robustness=False, progress=False,
    )
    text = (evaluate(config) / "RESULTS.md").read_text(encoding="utf-8")
    table = text.split("## Method comparison")[1].split("\n\n")[2].splitlines()
    assert table[0] == "| Metric | proposed | unet3d | hdenseunet | e2net |"
    tumour_dice = next(line for line in table if line.startswith("| Tumour Dice (per case)")).split("|")
    assert tumour_dice[3].strip() == "liver only" and tumour_dice[4].strip() != "liver only"
    liver_dice = next(line for line in table if line.startswith("| Liver Dice (per case)")).split("|")
    assert all(cell.strip() not in ("liver only", "not trained") for cell in liver_dice[2:6])
    assert "run (slab_2_5d)" in text and "liver-only model" in text


@pytest.mark.parametrize("model", list(KINDS))
def test_summary_command_for_baselines(model, capsys):
    assert train_cli(["summary", "--model", model, "--preset", "lite", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == model and summary["total_parameters"] > 0
    assert train_cli(["summary", "--model", model, "--no-attention"]) == 2
