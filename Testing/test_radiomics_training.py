"""Radiomics classifier: negative sampling, feature selection, the random forest in ONNX, the filter stage.

Real pyradiomics, scikit-learn, XGBoost, skl2onnx and ONNX Runtime on small synthetic volumes.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("radiomics")
pytest.importorskip("skl2onnx")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from LiverTumorSegLib import radiomics_catalogue as catalogue  # noqa: E402
from LiverTumorSegLib import radiomics_filter as rf  # noqa: E402
from LiverTumorSegLib.bundle import load_bundle, write_bundle  # noqa: E402
from LiverTumorSegLib.errors import BundleError, Cancelled, InputError  # noqa: E402
from LiverTumorSegLib.preprocess import InputContract  # noqa: E402
from livertumorseg_training import feature_selection as fs  # noqa: E402
from livertumorseg_training import lesion_classifier as lc  # noqa: E402
from livertumorseg_training import radiomics_samples as rs  # noqa: E402

SPACING = (1.0, 1.0, 2.5)


# ------------------------------------------------------------------------------------------ helpers


def liver_labels(shape=(24, 96, 96), spacing=SPACING, radii_mm=(40.0, 36.0, 28.0), tumours=()):
    """0/1/2 labels: an ellipsoidal liver (x, y, z semi-axes in mm) with spherical tumours ((z, y, x), r mm)."""
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    zc, yc, xc = (z - nz / 2) * spacing[2], (y - ny / 2) * spacing[1], (x - nx / 2) * spacing[0]
    labels = ((xc / radii_mm[0]) ** 2 + (yc / radii_mm[1]) ** 2 + (zc / radii_mm[2]) ** 2 <= 1).astype(np.uint8)
    for (cz, cy, cx), r in tumours:
        labels[((z - cz) * spacing[2]) ** 2 + ((y - cy) * spacing[1]) ** 2 + ((x - cx) * spacing[0]) ** 2 <= r * r] = 2
    return labels


def ct_from_labels(labels, seed=0, tumour_hu=50.0):
    rng = np.random.default_rng(seed)
    hu = np.where(labels == 0, 40.0, 110.0)
    hu[labels == 2] = tumour_hu
    return np.rint(hu + rng.normal(0, 8, labels.shape)).astype(np.int16)


TWO_FEATURES = ["original_firstorder_Mean", "original_shape_VoxelVolume"]


def tiny_classifier(folder, names=TWO_FEATURES, seed=0):
    """A real random forest on synthetic features: dark regions (mean < ~85 HU) are tumours."""
    rng = np.random.default_rng(seed)
    n = 120
    y = np.repeat([1, 0], n // 2)
    mean_hu = np.where(y == 1, rng.uniform(30, 80, n), rng.uniform(95, 130, n))
    X = np.column_stack([mean_hu, rng.uniform(50, 3000, n)])
    mu, sd = X.mean(axis=0), X.std(axis=0)
    model = lc.make_random_forest(seed).fit(((X - mu) / sd).astype(np.float32), y)
    onnx_path = lc.export_onnx(model, 2, folder / lc.ONNX_FILE, check_X=(X - mu) / sd)
    meta = {"feature_names": list(names), "mean": mu.tolist(), "std": sd.tolist(), "tau_rf": 0.5,
            "settings": catalogue.feature_settings()}
    json_path = folder / lc.JSON_FILE
    json_path.write_text(json.dumps(meta))
    return onnx_path, json_path


def branch_onnx(path, channels, low, high=None, scale=0.5):
    """A real ONNX 'branch': with m the mean over the input channels, sigmoid(scale · (m − low)), times
    sigmoid(scale · (high − m)) when ``high`` is given; (N, C, H, W) → (N, 1, H, W)."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=1, axes=[1]),
        helper.make_node("Sub", ["mean", "low"], ["above"]),
        helper.make_node("Mul", ["above", "scale"], ["logit_low"]),
        helper.make_node("Sigmoid", ["logit_low"], ["p_low" if high is not None else "probability"]),
    ]
    initializers = [helper.make_tensor("low", TensorProto.FLOAT, [], [low]),
                    helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
    if high is not None:
        nodes += [
            helper.make_node("Sub", ["high", "mean"], ["below"]),
            helper.make_node("Mul", ["below", "scale"], ["logit_high"]),
            helper.make_node("Sigmoid", ["logit_high"], ["p_high"]),
            helper.make_node("Mul", ["p_low", "p_high"], ["probability"]),
        ]
        initializers.append(helper.make_tensor("high", TensorProto.FLOAT, [], [high]))
    graph = helper.make_graph(
        nodes, "branch",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def threshold_bundle(tmp_path):
    """A bundle whose 'cascade' thresholds intensity: liver = bright, tumour = darker but not fat."""
    # uint8 = (HU + 100) · 255 / 500: liver 110 HU → 107, tumour 50 HU → 77, fat −80 HU → 10. The tumour
    # branch sees the 3-slice stack and the liver probability: its channel mean is ≈ 58 on a tumour.
    files = {
        "liver.onnx": branch_onnx(tmp_path / "l.onnx", 3, 92.0),
        "tumour.onnx": branch_onnx(tmp_path / "t.onnx", 4, 45.0, 70.0),
    }
    manifest = {"name": "test", "version": "1", "input": InputContract().to_dict(),
                "components": {"liver": {"file": "liver.onnx"}, "tumour": {"file": "tumour.onnx"}}}
    write_bundle(tmp_path / "bundle", manifest, files)
    return tmp_path / "bundle"


# ------------------------------------------------------------------------------------------ sampling


def test_ball_is_physical_on_anisotropic_grids():
    offsets = rs.ball_offsets(4, SPACING)
    assert np.abs(offsets[:, 0]).max() == 1 and np.abs(offsets[:, 1]).max() == 4  # 4 px in-plane, 4 mm / 2.5 mm in z
    distance = np.sqrt(((offsets * np.array([2.5, 1.0, 1.0])) ** 2).sum(axis=1))
    assert distance.max() <= 4.0
    assert len(rs.ball_offsets(2, (1, 1, 1))) == 33  # the digital ball of radius 2


def test_negative_queue_spreads_scales_and_kinds_evenly():
    queue = rs.NegativeQueue(np.random.default_rng(0))
    jobs = queue.take(24 * 5)
    assert len(rs.RADII) == 24 and rs.RADII[0] == 2 and rs.RADII[-1] == 48
    for r in rs.RADII:
        kinds = [k for radius, k in jobs if radius == r]
        assert len(kinds) == 5 and kinds.count("parenchyma") == 2 and kinds.count("boundary") == 3
    first_round = rs.NegativeQueue(np.random.default_rng(0)).take(24)  # about one negative per scale
    assert sorted(r for r, _ in first_round) == list(rs.RADII)
    assert 8 <= [k for _, k in first_round].count("parenchyma") <= 11
    queue.give_back([(48, "boundary")])
    assert queue.take(1) == [(48, "boundary")]
    again = rs.NegativeQueue(np.random.default_rng(0)).take(24 * 5)
    assert again == jobs


def test_negative_sampler_respects_the_paper_rules():
    labels = liver_labels(tumours=[((12, 48, 40), 6.0), ((10, 40, 60), 4.0)])
    jobs = [(r, k) for r in (2, 6, 12) for k in ("parenchyma", "boundary", "boundary")] + [(48, "parenchyma")]
    regions, unfilled = rs.sample_negatives(labels, SPACING, jobs, np.random.default_rng(1), case_id="c")
    assert (48, "parenchyma") in unfilled  # no 48 mm ball fits in this small liver
    assert len(regions) >= 8
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(labels >= 1, sampling=SPACING[::-1])
    for region in regions:
        full = np.zeros(labels.shape, bool)
        full[region.box] = region.mask
        ball = len(rs.ball_offsets(region.radius, SPACING))
        inside_volume = int(full.sum())
        outside = (ball - inside_volume) + int((labels[full] == 0).sum())
        assert outside / ball <= 0.2 and (labels[full] == 2).sum() / ball <= 0.1
        assert labels[region.seed] == 1
        seed_depth = depth[region.seed]
        assert seed_depth > region.radius if region.kind == "parenchyma" else seed_depth <= region.radius
        assert region.label == 0 and region.radius in (2, 6, 12)


def test_tumours_and_real_false_positives_are_26_connected_components():
    labels = liver_labels(tumours=[((12, 48, 40), 5.0)])
    labels[5, 20, 20] = labels[6, 21, 21] = labels[7, 22, 22] = 2  # diagonal chain: one 26-connected component
    assert [r.voxels >= 3 for r in rs.tumour_regions(labels)] == [True, True]
    predicted = labels.copy()
    predicted[predicted == 2] = 1
    predicted[10:14, 44:52, 36:44] = 2  # overlaps the reference tumour: a true detection
    predicted[14:16, 60:66, 60:66] = 2  # does not: a false positive
    fps = rs.false_positive_regions(predicted, labels, "c")
    assert len(fps) == 1 and fps[0].kind == "false-positive" and fps[0].voxels == 2 * 6 * 6


# ------------------------------------------------------------------------------------------ selection


def synthetic_problem(n=120, p=70, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    y = (X[:, :5] @ np.array([1.0, -1.0, 0.8, 0.7, -0.6]) + 0.3 * rng.standard_normal(n) > 0).astype(int)
    X[:, 5] = 3 * X[:, 0] + 1  # redundant with feature 0
    X[:, 6] = 7.0  # constant
    X[::7, 7] = np.nan  # degenerate values are imputed
    return X, y, [f"f{i:02d}" for i in range(p)]


def test_selection_is_deterministic_and_finds_the_informative_features():
    X, y, names = synthetic_problem()
    first = fs.select_features(X, y, names, seed=0)
    second = fs.select_features(X, y, names, seed=0)
    assert first.selected == second.selected
    assert fs.MIN_FEATURES <= len(first.selected) <= fs.MAX_FEATURES
    assert {"f01", "f02", "f03", "f04"} <= set(first.selected)
    assert ("f00" in first.selected) != ("f05" in first.selected)  # one of the redundant pair
    assert "f06" in first.dropped["near_zero_variance"] and "f06" not in first.selected
    assert first.vote_threshold < 6  # 5 informative features cannot fill six top-30 lists: the fallback ran
    assert np.isfinite(first.mean).all() and (first.std > 0).all()


def test_selection_keeps_the_20_best_when_more_pass():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((150, 25))
    y = (X.sum(axis=1) > 0).astype(int)
    result = fs.select_features(X, y, [f"g{i}" for i in range(25)], seed=0)
    assert result.vote_threshold == 6 and len(result.selected) == fs.MAX_FEATURES


def test_distance_correlation_and_relieff():
    x = np.linspace(-1, 1, 101)
    assert fs.distance_correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert abs(np.corrcoef(x, x**2)[0, 1]) < 1e-9 and fs.distance_correlation(x, x**2) > 0.4
    X, y, _ = synthetic_problem(n=150, p=15)
    X, _ = fs.impute_nonfinite(X)
    weights = fs.relieff_weights(X, y)
    assert weights[[1, 2]].min() > np.max(weights[8:])


# ------------------------------------------------------------------------------------------ classifier


def test_random_forest_in_onnx_equals_scikit_learn(tmp_path):
    import onnxruntime as ort

    X, y, _ = synthetic_problem(n=200, p=12)
    X, _ = fs.impute_nonfinite(X)
    model = lc.make_random_forest(0).fit(X.astype(np.float32), y)
    path = lc.export_onnx(model, 12, tmp_path / "rf.onnx", check_X=X)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_p = session.run(["probabilities"], {"input": X.astype(np.float32)})[0]
    assert np.abs(onnx_p - model.predict_proba(X.astype(np.float32))).max() < 1e-5
    assert model.get_params()["n_estimators"] == 350 and model.get_params()["min_samples_leaf"] == 10


def test_table1_and_tau(tmp_path):
    X, y, _ = synthetic_problem(n=120, p=8)
    results = lc.compare_classifiers(X, y, folds=5, seed=0)
    assert list(results) == ["Random Forest", "SVM (RBF kernel)", "SVM (linear kernel)", "Logistic Regression"]
    for r in results.values():
        assert 0 <= r["accuracy_mean"] <= 1 and 0 <= r["auc_mean"] <= 1 and r["folds"] == 5
    text = lc.write_table1(results, tmp_path / "table1.md").read_text(encoding="utf-8")
    assert "| Random Forest | n_trees = 350" in text and "C = 0.2, γ = 0.4" in text
    tau, metrics = lc.choose_tau(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.6, 0.9]))
    assert tau == pytest.approx(0.45) and metrics["youden_j"] == 1.0 and metrics["accuracy"] == 1.0
    # Overlapping scores: keeping both tumours needs τ ≤ 0.35, so τ is the middle of (0.1, 0.35].
    tau, metrics = lc.choose_tau(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.9]))
    assert tau == pytest.approx(0.225) and metrics["youden_j"] == pytest.approx(0.5) and metrics["sensitivity"] == 1
    # 20 tumours, two of them scored among the negatives: Youden's J would drop both (τ above 0.4, J = 0.9);
    # keeping 95 % drops only the weakest one.
    y = np.array([1] * 20 + [0] * 20)
    p = np.array([0.3, 0.35] + [0.8] * 18 + list(np.linspace(0.1, 0.4, 20)))
    tau, metrics = lc.choose_tau(y, p)
    assert 0.3 < tau < 0.35 and metrics["sensitivity"] == 0.95
    assert metrics["specificity"] == pytest.approx(np.mean(np.linspace(0.1, 0.4, 20) < tau))
    tau, metrics = lc.choose_tau(y, p, min_sensitivity=1.0)
    assert tau < 0.3 and metrics["sensitivity"] == 1.0


# ------------------------------------------------------------------------------------------ the filter


@pytest.fixture
def scene():
    """A liver with a true hypodense lesion (component 1) and a parenchyma-like false candidate (component 2)."""
    labels = liver_labels(tumours=[((8, 40, 40), 6.0), ((16, 56, 60), 5.0)])
    hu = ct_from_labels(labels)
    second = rs.tumour_regions(labels)[1]
    full = np.zeros(labels.shape, bool)
    full[second.box] = second.mask
    hu[full] = np.rint(110 + np.random.default_rng(5).normal(0, 8, int(full.sum())))  # looks like liver
    labels[21, 48, 48] = 2  # a one-voxel candidate (component 3): degenerate texture, still classified
    full[21, 48, 48] = True
    return hu, labels, full


def test_filter_keeps_accepted_and_drops_rejected_candidates(tmp_path, scene):
    hu, labels, false_candidate = scene
    classifier = rf.LesionClassifier.from_files(*tiny_classifier(tmp_path))
    stages = []
    out, kept, info = rf.filter_lesions(hu, labels, SPACING, classifier, progress=lambda s, f: stages.append((s, f)))
    assert list(kept) == [1] and kept[1] >= classifier.tau
    assert info["candidates"] == 3 and info["dropped"] == 2 and set(info["dropped_probabilities"]) == {2, 3}
    assert (out[false_candidate] == 1).all() and (out[(labels == 2) & ~false_candidate] == 2).all()
    assert ((out == 2) == ((labels == 2) & ~false_candidate)).all() and (out[labels != 2] == labels[labels != 2]).all()
    assert stages[0] == (rf.STAGE, 0.0) and stages[-1] == (rf.STAGE, 1.0)
    # Worker processes give the same answer.
    _, kept_parallel, info_parallel = rf.filter_lesions(hu, labels, SPACING, classifier, threads=2, executor="process")
    assert kept_parallel == pytest.approx(kept) and info_parallel["executor"] == "process"


def test_filter_cancels(tmp_path, scene):
    hu, labels, _ = scene
    classifier = rf.LesionClassifier.from_files(*tiny_classifier(tmp_path))
    with pytest.raises(Cancelled):
        rf.filter_lesions(hu, labels, SPACING, classifier, cancel=lambda: True)
    calls = []
    with pytest.raises(Cancelled):  # cancelled after the first candidate
        rf.filter_lesions(hu, labels, SPACING, classifier, cancel=lambda: calls.append(1) or len(calls) > 2)
    with pytest.raises(Cancelled):
        rf.filter_lesions(hu, labels, SPACING, classifier, threads=2, executor="thread", cancel=lambda: True)


def test_classifier_component_in_a_bundle(tmp_path, scene):
    bundle_dir = threshold_bundle(tmp_path)
    onnx_path, json_path = tiny_classifier(tmp_path)
    bundle = lc.add_to_bundle(bundle_dir, onnx_path, json_path)
    assert bundle.has("lesion_classifier") and bundle.manifest["thresholds"]["tau_rf"] == 0.5
    assert bundle.component("lesion_classifier")["features"] == TWO_FEATURES
    classifier = rf.LesionClassifier.from_bundle(load_bundle(bundle_dir))
    features = [{"original_firstorder_Mean": 50.0, "original_shape_VoxelVolume": 500.0},
                {"original_firstorder_Mean": 120.0, "original_shape_VoxelVolume": 500.0},
                {"original_firstorder_Mean": float("nan"), "original_shape_VoxelVolume": 500.0}]
    p = classifier.predict(features)
    assert p[0] > 0.5 > p[1] and np.isfinite(p[2])
    # A classifier trained with other extraction settings is refused.
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    meta["settings"]["boundary_band_mm"] = 3.0
    json_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="other radiomic feature settings"):
        rf.LesionClassifier.from_files(onnx_path, json_path)


def test_candidate_whose_features_fail_is_kept_and_reported(tmp_path, scene):
    """GLCM correlation of a one-voxel region cannot be computed: that candidate is kept, not judged on imputed means."""
    hu, labels, _ = scene
    onnx_path, json_path = tiny_classifier(tmp_path)
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    meta["feature_names"] = ["original_firstorder_Mean", "original_glcm_Correlation"]
    json_path.write_text(json.dumps(meta))
    classifier = rf.LesionClassifier.from_files(onnx_path, json_path)
    out, kept, info = rf.filter_lesions(hu, labels, SPACING, classifier)
    assert info["feature_failures"] == {3: 1} and info["kept_despite_failed_features"] == [3]
    assert 3 in kept and out[21, 48, 48] == 2


def test_classifier_from_another_pyradiomics_major_version_is_refused(tmp_path):
    onnx_path, json_path = tiny_classifier(tmp_path)
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    meta["pyradiomics_version"] = f"v{int(catalogue.pyradiomics_version().lstrip('v').split('.')[0]) + 1}.0.0"
    json_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="trained with pyradiomics"):
        rf.LesionClassifier.from_files(onnx_path, json_path)


# ------------------------------------------------------------------------------------------ end to end


def write_lits_case(folder, number, seed):
    """A small LiTS-style case (0.8 mm in-plane, 2.5 mm slices): a liver in fat with three tumours and an
    unannotated dark blob."""
    rng = np.random.default_rng(seed)
    shape, spacing = (24, 120, 120), (0.8, 0.8, 2.5)
    tumours = [((rng.integers(9, 15), rng.integers(50, 70), rng.integers(40, 80)), r) for r in (4.0, 5.0, 6.5)]
    labels = liver_labels(shape, spacing, (36.0, 32.0, 24.0), tumours)
    hu = ct_from_labels(labels, seed)
    body = liver_labels(shape, spacing, (46.0, 44.0, 200.0)) > 0
    hu[(labels == 0) & body] = np.rint(-80 + rng.normal(0, 8, int(((labels == 0) & body).sum())))  # fat
    hu[~body] = -1000
    hu[12:14, 40:46, 58:64] = 55  # dark, unannotated: the threshold 'cascade' will call it tumour
    for array, name in ((hu, f"volume-{number}.nii.gz"), (labels, f"segmentation-{number}.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(folder / name))


def test_train_lesion_classifier_end_to_end(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for number in range(2):
        write_lits_case(data, number, seed=number)
    bundle_dir = threshold_bundle(tmp_path)
    summary = lc.train_lesion_classifier(
        data, bundle_dir, seed=0, use_cascade_false_positives=True, out_dir=tmp_path / "run", radii=(2, 4, 6),
    )
    samples = summary["samples"]
    assert samples["tumour"] >= 4 and samples["parenchyma"] + samples["boundary"] >= 3
    assert samples["false-positive"] >= 1  # the dark, unannotated blob
    assert 1 <= len(summary["selected_features"]) <= fs.MAX_FEATURES
    assert set(summary["selected_features"]) <= set(catalogue.FEATURE_NAMES)
    assert (tmp_path / "run" / "table1.md").is_file() and (tmp_path / "run" / "radiomics_samples.npz").is_file()
    bundle = load_bundle(bundle_dir)
    classifier = rf.LesionClassifier.from_bundle(bundle)
    assert classifier.feature_names == summary["selected_features"] and 0 <= classifier.tau <= 1
    meta = json.loads((bundle.path / lc.JSON_FILE).read_text(encoding="utf-8"))
    assert meta["settings"] == catalogue.feature_settings() and meta["samples"]["total"] == samples["total"]
    # Refitting from the saved samples reads the same table and gives the same classifier.
    table = rs.SampleTable.load(tmp_path / "run")
    assert table.counts() == {k: v for k, v in samples.items() if k in table.counts()}
    assert table.names == list(catalogue.FEATURE_NAMES) and len(table.radii) == len(table.y) == samples["total"]
    again = lc.train_lesion_classifier(data, bundle_dir, seed=0, out_dir=tmp_path / "refit", samples_from=tmp_path / "run")
    assert again["selected_features"] == summary["selected_features"] and again["tau_rf"] == summary["tau_rf"]


def test_classifier_cases_default_to_the_cascade_s_own_from_several_folders(tmp_path, capsys):
    """A cascade trained on phantoms and real scans: the classifier takes the cases it was trained and validated
    on from each --data folder (ids FOLDER/ID), never a held-out scan, and samples them all."""
    from livertumorseg_training.cli import main

    phantoms, real = tmp_path / "phantoms", tmp_path / "real"
    phantoms.mkdir()
    for number in range(3):
        write_lits_case(phantoms, number, seed=number)
    real.mkdir()
    for name, seed in (("r0", 5), ("held", 6)):
        write_lits_case(real, 0, seed=seed)
        (real / "volume-0.nii.gz").rename(real / f"{name}_ct.nii.gz")
        (real / "segmentation-0.nii.gz").rename(real / f"{name}_label.nii.gz")
    bundle_dir = threshold_bundle(tmp_path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    manifest["training"] = {"data": "phantoms, elsewhere", "config": {"real_data": str(real)}, "split": {"train": ["phantoms/lits-0", "elsewhere/lits-1"], "validation": ["phantoms/lits-2"],
                                      "test": [], "real_train": ["r0"], "real_holdout": ["held"]}}
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    assert main(["lesion-classifier", "--data", str(phantoms), str(real), "--bundle", str(bundle_dir),
                 "--out", str(tmp_path / "run")]) == 0
    table = rs.SampleTable.load(tmp_path / "run")
    assert sorted(set(table.case_ids)) == ["phantoms/lits-0", "phantoms/lits-2", "real/r0"]
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    write_lits_case(unrelated, 7, seed=7)
    assert main(["lesion-classifier", "--data", str(unrelated), "--bundle", str(bundle_dir),
                 "--out", str(tmp_path / "x")]) == InputError.exit_code
    assert "None of the cases the bundle" in capsys.readouterr().err and not (tmp_path / "x").exists()
