"""Boundary CNN (training package): patch networks, exact dense rewrite (torch and ONNX Runtime), band
samples, training on a learnable problem, export into a bundle, refinement in the engine, the studies."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

import torch.nn as nn  # noqa: E402

from LiverTumorSegLib.bundle import load_bundle, write_bundle  # noqa: E402
from LiverTumorSegLib.image_io import Geometry, Image, write_image  # noqa: E402
from LiverTumorSegLib.preprocess import InputContract, prepare_volume  # noqa: E402
from LiverTumorSegLib.refinement import boundary_band_voxels, crop_edge, refine_boundaries  # noqa: E402
from livertumorseg_training.boundary_training import (  # noqa: E402
    apply_tuning,
    architecture_study,
    augment_patches,
    case_band,
    dense_differences,
    export_boundary_cnn,
    export_dense_onnx,
    fit_boundary_cnn,
    patch_size_study,
    refinement_effect,
    sample_boundary_patches,
    train_boundary_cnn,
    tune_refinement,
    write_study_table,
)
from livertumorseg_training.networks import MODELS  # noqa: E402
from livertumorseg_training.networks.boundary import (  # noqa: E402
    PatchClassifier,
    alexnet3d,
    alexnet_layout,
    build_boundary_cnn,
    resnet3d,
    to_dense,
)

torch.set_num_threads(1)
SPACING = (1.0, 1.0, 2.5)


def _randomise_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that the rewrite must carry them over."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _strided(patch: int = 11) -> PatchClassifier:
    """A custom classifier with a stride-2 convolution and stride-2 pooling: exercises the à trous rewrite."""
    assert patch == 11
    features = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(),  # 11 → 9
                             nn.Conv3d(4, 6, 3, stride=2), nn.ReLU(),  # 9 → 4, jump 2
                             nn.MaxPool3d(2, stride=2))  # 4 → 2, jump 4
    head = nn.Sequential(nn.Linear(6 * 8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    return PatchClassifier(features, head, patch)


@pytest.mark.parametrize("size", [9, 11, 13, 15])
def test_patch_networks_shapes_and_receptive_field(size):
    for model in (alexnet3d("lite", size), resnet3d("tiny", size)):
        model.eval()
        assert model.receptive_field == size and model.patch_size == size
        assert model(torch.rand(3, 1, size, size, size) * 255).shape == (3, 1)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 1, size + 2, size + 2, size + 2))  # one patch ↦ one output only
        dense = to_dense(model)
        box = torch.rand(1, 1, size + 4, size + 1, size + 6) * 255
        with torch.no_grad():
            out = dense(box)
            assert out.shape == (1, 1, 5, 2, 7)  # D − s + 1: receptive field = s
            changed = box.clone()
            changed[0, 0, size, 0, 0] = 255 - changed[0, 0, size, 0, 0]  # just outside the first block
            assert torch.equal(dense(changed)[0, 0, 0, 0, 0], out[0, 0, 0, 0, 0])
    assert alexnet_layout(11) == ["conv3", "conv3", "pool", "conv3", "conv3", "pool", "conv1", "fc1"]
    assert "boundary_alexnet3d" in MODELS and "boundary_resnet3d" in MODELS
    with pytest.raises(ValueError, match="odd"):
        alexnet3d("lite", 10)


@pytest.mark.parametrize("name, size", [("alexnet3d", 9), ("alexnet3d", 11), ("alexnet3d", 13), ("alexnet3d", 15),
                                        ("resnet3d", 15), ("strided", 11)])
def test_dense_rewrite_equals_the_patch_classifier(name, size):
    torch.manual_seed(size)
    model = _strided() if name == "strided" else build_boundary_cnn(name, "lite" if name == "alexnet3d" else "tiny", size)
    _randomise_batch_norm(model, size)
    differences = dense_differences(model, box_shape=(size + 3, size + 7, size + 5), samples=24, seed=size)
    assert differences["patch_vs_dense"] < 1e-4  # at the eight corners of the output box and 24 random voxels
    dense = to_dense(model)
    assert not dense.training and all(not isinstance(m, nn.Dropout) for m in dense.modules())
    if name == "strided":
        dilations = [np.ravel(m.dilation)[0] for m in dense.modules() if isinstance(m, (nn.Conv3d, nn.MaxPool3d))]
        # conv, strided conv → dilation 1; stride-2 pool → 2; first FC (kernel 2) → 4; last FC → 1×1×1
        assert dilations == [1, 1, 2, 4, 1]


@pytest.mark.parametrize("name", ["alexnet3d", "resnet3d", "strided"])
def test_onnx_dense_network_equals_torch(tmp_path, name):
    import onnx
    import onnxruntime

    models = {"alexnet3d": lambda: alexnet3d("lite", 11), "resnet3d": lambda: resnet3d("tiny", 11), "strided": _strided}
    model = _randomise_batch_norm(models[name](), 3)
    path = export_dense_onnx(model, tmp_path / "dense.onnx")
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 17
    assert [i.name for i in graph.graph.input] == ["input"] and [o.name for o in graph.graph.output] == ["probability"]
    differences = dense_differences(model, path, box_shape=(14, 19, 23), samples=16)
    assert differences["onnx_vs_dense"] < 1e-4 and differences["patch_vs_dense"] < 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((2, 1, 13, 11, 30), np.float32)})[0]
    assert out.shape == (2, 1, 3, 1, 20)  # dynamic N, D, H, W


def _volume(seed: int, shape=(20, 56, 60), bright: bool = True, radii=(4, 9)):
    """Prepared-grid intensities and labels: a liver with spherical tumours (bright or dark) and noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape).astype(float)
    labels = np.zeros(shape, np.uint8)
    liver = (((z - shape[0] / 2) * 2.5 / 40) ** 2 + ((y - shape[1] / 2) / 24) ** 2 + ((x - shape[2] / 2) / 26) ** 2) <= 1
    labels[liver] = 1
    for _ in range(2):
        c = rng.uniform([7, 16, 16], [shape[0] - 7, shape[1] - 16, shape[2] - 16])
        r = rng.uniform(*radii)
        sphere = ((z - c[0]) * 2.5) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        labels[sphere & liver] = 2
    values = np.where(labels == 2, 190 if bright else 60, np.where(labels == 1, 110, 30))
    intensities = np.clip(values + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)
    return intensities, labels


def test_band_samples_balance_centre_and_determinism():
    intensities, labels = _volume(0)
    band = case_band("a", intensities, labels, SPACING, max_patch=15)
    in_band, distance = boundary_band_voxels(labels == 2, SPACING, 6)
    assert band.band.sum() == in_band.sum()  # the crop holds the whole band
    assert np.all(np.abs(band.distance[band.band]) <= 6)
    samples = sample_boundary_patches([band], 9, 300, seed=4)
    assert samples.counts() == {"positive": 300, "negative": 300} and samples.patches.shape == (600, 9, 9, 9)
    centres = samples.centres
    assert np.array_equal(labels[tuple(centres.T)] == 2, samples.labels == 1)  # inside = positive
    assert np.all(in_band[tuple(centres.T)]) and np.all(np.abs(samples.distance) <= 6)
    assert np.array_equal(np.sign(samples.distance), np.where(samples.labels == 1, -1, 1))
    assert np.array_equal(samples.patches[:, 4, 4, 4], intensities[tuple(centres.T)])  # centre = voxel
    for k in (0, 301, 599):
        assert np.array_equal(samples.patches[k], crop_edge(intensities, centres[k] - 4, centres[k] + 5))
    assert len(np.unique(centres, axis=0)) == 600  # drawn without replacement
    again = sample_boundary_patches([band], 9, 300, seed=4)
    assert np.array_equal(again.patches, samples.patches) and np.array_equal(again.centres, samples.centres)
    other = sample_boundary_patches([band], 9, 300, seed=5)
    assert not np.array_equal(other.centres, samples.centres)
    # two cases share the samples as evenly as their bands allow; too few voxels cut both classes alike
    two = sample_boundary_patches([band, case_band("b", *_volume(1), SPACING)], 11, 200, seed=0)
    assert np.bincount(two.case_index[two.labels == 1]).tolist() == [100, 100]
    small = sample_boundary_patches([band], 9, 10 ** 7, seed=0)
    assert small.counts()["positive"] == small.counts()["negative"] == min(len(band.positives), len(band.negatives))


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_trained_network_refines_an_eroded_tumour(tmp_path):
    """Real training at tiny scale ("bright = tumour"), dense export, and refinement in the engine."""
    bands = [case_band(str(i), *_volume(i, radii=(4, 13)), SPACING, max_patch=9) for i in range(4)]
    train = sample_boundary_patches(bands[:3], 9, 700, seed=0)
    val = sample_boundary_patches(bands[3:], 9, 150, seed=1)
    torch.manual_seed(0)
    model = alexnet3d("tiny", 9)
    fitted = fit_boundary_cnn(model, train, val, epochs_adam=3, epochs_sgd=1, batch_size=32, log=lambda *_: None)
    assert [h["phase"] for h in fitted["history"]] == ["adam"] * 3 + ["sgd"]
    assert fitted["validation_accuracy"] > 0.95

    path = export_dense_onnx(model, tmp_path / "boundary_cnn.onnx")
    entry = {"file": "boundary_cnn.onnx", "kind": "onnx", "patch_size": 9, "band_voxels": 6, "threshold": 0.5}
    bundle = write_bundle(tmp_path / "bundle", {"input": InputContract().to_dict(), "components": {"boundary_cnn": entry}},
                          {"boundary_cnn.onnx": path})
    intensities, truth_labels = _volume(11, radii=(10, 13))
    truth = truth_labels == 2
    liver = truth_labels > 0
    band, distance = boundary_band_voxels(truth, SPACING, 6)
    eroded = truth & (distance <= -3)  # 3 in-plane voxels of the boundary removed
    labels = np.where(liver, 1, 0).astype(np.uint8)
    labels[eroded] = 2
    refined, info = refine_boundaries(intensities, labels, SPACING, bundle, threads=1)
    assert info["added_voxels"] > 0.8 * (truth & ~eroded).sum()
    assert _dice(refined == 2, truth) > max(0.9, _dice(eroded, truth) + 0.1)
    assert not np.any((refined == 2) & ~liver) and np.array_equal(refined > 0, liver)


def test_training_is_deterministic():
    band = case_band("a", *_volume(2), SPACING, max_patch=9)
    samples = sample_boundary_patches([band], 9, 80, seed=0)
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        model = alexnet3d("tiny", 9)
        fit_boundary_cnn(model, samples, samples, epochs_adam=1, epochs_sgd=1, seed=7, log=lambda *_: None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


GEOMETRY = Geometry((2.0, 2.0, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def lits(tmp_path_factory):
    """Three small CT cases (HU) in LiTS layout, each with a liver and hypodense tumours."""
    root = tmp_path_factory.mktemp("lits")
    for n in range(3):
        intensities, labels = _volume(20 + n, shape=(16, 32, 34), bright=False)
        body = np.zeros(labels.shape, bool)
        body[:, 2:30, 2:32] = True
        hu = np.where(labels == 2, 60, np.where(labels == 1, 110, np.where(body, 30, -1000)))
        hu = (hu + np.random.default_rng(n).normal(0, 6, hu.shape)).astype(np.int16)
        write_image(Image(hu, GEOMETRY), root / f"volume-{n}.nii.gz")
        write_image(Image(labels, GEOMETRY), root / f"segmentation-{n}.nii.gz")
    return root


def _liver_only_onnx(path):
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1, axes=[1]), helper.make_node("Sigmoid", ["mean"], ["probability"])],
        "branch", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_train_export_and_refine_end_to_end(lits, tmp_path):
    result = train_boundary_cnn(lits, tmp_path / "run", preset="tiny", patch=9, samples_per_class=150,
                                validation_cases=["lits-2"], epochs_adam=1, epochs_sgd=1, seed=0, device="cpu",
                                log=lambda *_: None)
    assert result.split == {"train": ["lits-0", "lits-1"], "validation": ["lits-2"]}
    assert result.samples["train"] == {"positive": 150, "negative": 150}
    assert [h["phase"] for h in result.history] == ["adam", "sgd"] and 0 <= result.validation_accuracy <= 1
    assert result.checkpoint.exists() and (tmp_path / "run" / "boundary_cnn_history.json").exists()

    manifest = {"name": "demo", "version": "0", "input": InputContract().to_dict(), "components": {"liver": {"file": "liver.onnx"}},
                "metrics": {"validation": {"dice_liver": 0.9}}, "training": {"split": {"train": ["x"]}}}
    write_bundle(tmp_path / "bundle", manifest, {"liver.onnx": _liver_only_onnx(tmp_path / "liver.onnx")})
    bundle = export_boundary_cnn(result, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")  # checksums of the new and the kept files verify
    entry = loaded.component("boundary_cnn")
    assert entry["patch_size"] == 9 and entry["band_voxels"] == 6 and entry["file"] == "boundary_cnn.onnx"
    assert set(loaded.manifest["files"]) == {"liver.onnx", "boundary_cnn.onnx"} and loaded.has("liver")
    assert loaded.manifest["metrics"]["validation"] == {"dice_liver": 0.9}  # existing entries are kept
    assert loaded.manifest["metrics"]["boundary_cnn"]["accuracy"] == result.validation_accuracy
    assert loaded.manifest["training"]["boundary_cnn"]["split"] == result.split
    assert loaded.manifest["onnx_max_abs_difference"]["boundary_cnn"] < 1e-4
    assert bundle.manifest == loaded.manifest
    again = export_boundary_cnn(result.checkpoint, tmp_path / "bundle")  # from the checkpoint file as well
    assert again.component("boundary_cnn")["patch_size"] == 9

    from LiverTumorSegLib.image_io import read_image, to_canonical

    image = read_image(lits / "volume-2.nii.gz")
    prepared = prepare_volume(to_canonical(image)[0], loaded.contract,
                              labels=to_canonical(read_image(lits / "segmentation-2.nii.gz"))[0].array)
    refined, info = refine_boundaries(prepared.intensities, prepared.labels, prepared.grid.spacing, loaded, threads=1)
    assert info["band_voxels"] > 0 and info["tiles"] > 0
    assert np.array_equal(refined > 0, prepared.labels > 0)

    rows = refinement_effect(lits, tmp_path / "bundle", ["lits-2"], perturbations=(0, -2), log=lambda *_: None)
    assert [(r["case"], r["perturbation"]) for r in rows] == [("lits-2", 0), ("lits-2", -2)]
    assert rows[0]["dice_before"] == 1.0 and rows[1]["dice_before"] < 1.0
    assert all(0 <= r["dice_after"] <= 1 for r in rows)


def test_studies_write_tables(lits, tmp_path):
    options = dict(preset="tiny", samples_per_class=60, validation_cases=["lits-2"], epochs_adam=1, epochs_sgd=0,
                   log=lambda *_: None)
    rows = patch_size_study(lits, sizes=(7, 9), out_dir=tmp_path / "patch", **options)
    assert [r["patch"] for r in rows] == ["7³", "9³"] and all(0 <= r["accuracy"] <= 1 for r in rows)
    arch = architecture_study(lits, patch=9, out_dir=tmp_path / "arch", **options)
    assert [r["model"] for r in arch] == ["alexnet3d", "resnet3d"]
    table = write_study_table(rows + arch, tmp_path / "table3.md", title="Patch size")
    text = table.read_text(encoding="utf-8")
    assert text.startswith("# Patch size") and "| model | patch | accuracy |" in text and text.count("\n| ") == 5
    assert (tmp_path / "table3.csv").read_text(encoding="utf-8").splitlines()[0].startswith("model,patch,accuracy")
    assert json.loads((tmp_path / "patch" / "patch9" / "boundary_cnn_history.json").read_text(encoding="utf-8"))["config"]["patch_size"] == 9


def test_augmentation_keeps_the_centre_voxel_and_maps_intensities_affinely():
    patches = torch.from_numpy(np.random.default_rng(0).permutation(9 ** 3).reshape(1, 1, 9, 9, 9) % 200 + 20.0)
    generator = torch.Generator().manual_seed(3)
    shapes, moved = set(), 0
    for _ in range(20):
        out = augment_patches(patches.clone(), generator)
        shapes.add(tuple(out.shape))
        # a flip or transpose moves voxels but not the centre; the intensity map is one gain and one offset
        gain, offset = np.polyfit(np.sort(patches.ravel().numpy()), np.sort(out.ravel().numpy()), 1)
        assert 0.9 <= gain <= 1.1 and -10 - 12.75 <= offset <= 10 + 12.75
        np.testing.assert_allclose(out[0, 0, 4, 4, 4], patches[0, 0, 4, 4, 4] * gain + offset, atol=1e-3)
        moved += not torch.allclose(out, patches * gain + offset, atol=1e-2)
        assert out.min() >= 0 and out.max() <= 255
    assert shapes == {(1, 1, 9, 9, 9)} and moved >= 10  # 15 of the 16 symmetries move voxels
    again = augment_patches(patches.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(again, augment_patches(patches.clone(), torch.Generator().manual_seed(3)))


def test_refinement_tuning_scores_the_engines_relabelling(lits, tmp_path):
    """Tuning on a phantom with the shipped cascade: the band-0 pair is the unrefined Dice, and the
    (6, 0.5) pair is what the engine's refinement stage gives on the same labels."""
    import shutil

    from LiverTumorSegLib.bundle import DEFAULT_BUNDLE
    from LiverTumorSegLib.image_io import to_canonical
    from LiverTumorSegLib.metrics import dice
    from LiverTumorSegLib.phantoms import generate_phantom
    from LiverTumorSegLib.pipeline import PipelineOptions, segment
    from livertumorseg_training.datasets import find_cases, load_case

    data = tmp_path / "data"
    phantom = generate_phantom(7, size="small")  # one where the shipped cascade finds the tumours
    write_image(phantom.image, data / "volume-0.nii.gz")
    write_image(phantom.image.with_array(phantom.label), data / "segmentation-0.nii.gz")
    result = train_boundary_cnn(lits, tmp_path / "run", preset="tiny", patch=9, samples_per_class=150,
                                validation_cases=["lits-2"], epochs_adam=1, epochs_sgd=0, seed=0, device="cpu",
                                log=lambda *_: None)
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    export_boundary_cnn(result, tmp_path / "bundle")
    tuning = tune_refinement(data, tmp_path / "bundle", ["lits-0"], bands=(0.0, 2.0, 6.0), thresholds=(0.5, 0.9),
                             log=lambda *_: None)
    assert tuning["cases"] == ["lits-0"] and len(tuning["rows"]) == 6
    by_pair = {(r["band"], r["threshold"]): r["dice"] for r in tuning["rows"]}
    assert by_pair[(0.0, 0.5)] == by_pair[(0.0, 0.9)] == tuning["unrefined_dice"] > 0.1
    assert tuning["best"]["dice"] == max(by_pair.values())

    bundle = load_bundle(tmp_path / "bundle")
    image, reference = load_case(find_cases(data)[0])
    predicted = segment(image, bundle, PipelineOptions(threads=1, refine=False)).labels.array
    canonical = to_canonical(image)[0]
    prepared = prepare_volume(canonical, bundle.contract, labels=to_canonical(image.with_array(predicted))[0].array)
    truth = prepare_volume(canonical, bundle.contract, labels=to_canonical(image.with_array(reference))[0].array).labels == 2
    refined, info = refine_boundaries(prepared.intensities, prepared.labels, prepared.grid.spacing, bundle, threads=1)
    assert info["candidate_voxels"] > 0
    assert by_pair[(6.0, 0.5)] == round(dice(refined == 2, truth), 4)

    apply_tuning(tmp_path / "bundle", tuning)
    entry = load_bundle(tmp_path / "bundle").component("boundary_cnn")
    assert (entry["band_voxels"], entry["threshold"]) == (tuning["best"]["band"], tuning["best"]["threshold"])
    assert load_bundle(tmp_path / "bundle").manifest["metrics"]["boundary_cnn"]["tuning"]["best"] == tuning["best"]


def test_boundary_cnn_command_trains_on_the_cascade_s_cases_of_several_folders(lits, tmp_path):
    """boundary-cnn --data PHANTOMS REAL: the cases the bundle's cascade was trained on (ids FOLDER/ID), its
    validation cases for validation, never a held-out scan; the split lands in the bundle's manifest."""
    import shutil

    from livertumorseg_training.cli import main

    for name in ("phantoms", "real"):
        shutil.copytree(lits, tmp_path / name)
    manifest = {"name": "demo", "version": "0", "input": InputContract().to_dict(), "components": {"liver": {"file": "liver.onnx"}},
                "training": {"data": "phantoms, synth", "config": {"real_data": str(tmp_path / "real")},
                             "split": {"train": ["phantoms/lits-0", "phantoms/lits-1"], "validation": ["phantoms/lits-2"],
                                       "real_train": ["lits-0"], "real_holdout": ["lits-1"]}}}
    write_bundle(tmp_path / "bundle", manifest, {"liver.onnx": _liver_only_onnx(tmp_path / "liver.onnx")})
    assert main(["boundary-cnn", "--data", str(tmp_path / "phantoms"), str(tmp_path / "real"), "--bundle",
                 str(tmp_path / "bundle"), "--out", str(tmp_path / "run"), "--samples-per-class", "150",
                 "--epochs-adam", "1", "--epochs-sgd", "0", "--no-tune"]) == 0
    recorded = load_bundle(tmp_path / "bundle").manifest["training"]["boundary_cnn"]
    assert recorded["split"] == {"train": ["phantoms/lits-0", "phantoms/lits-1", "real/lits-0"],
                                 "validation": ["phantoms/lits-2"]}
