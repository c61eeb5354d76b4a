"""The radiomics lesion classifier (paper §3.3.2 and §4.2–4.3): training, τ_rf, Table 1, ONNX export.

- Random forest as in §4.2: 350 trees, maximum depth 16, at least 10 samples per leaf, balanced class
  weights, on the selected features standardised with the training set's mean and standard deviation.
- τ_rf is chosen on validation data as the highest probability threshold that keeps 95 % of the true
  tumours (:func:`choose_tau`), placed in the middle of the score gap below it. Validation
  data are held-out *cases* (20 %, at least one) when there are five cases or more, so that the regions
  of one patient never sit on both sides; with fewer cases, a stratified 20 % of the regions.
- The exported model is the forest trained on the training cases; its ONNX form (skl2onnx, float32 input
  ``[N, n_features]``, no ZipMap, output ``probabilities`` [N, 2]) must reproduce scikit-learn's
  probabilities to 1e-5 or the export fails.
- Table 1 in kind (``compare_classifiers``): 5-fold stratified cross-validation of the random forest,
  an RBF SVM (C = 0.2, γ = 0.4), a linear SVM (C = 1.0) and L2 logistic regression (C = 0.001), with
  standardisation fitted inside each training fold; accuracy and ROC AUC as mean ± standard deviation.

``train_lesion_classifier`` runs everything on a dataset and adds the ``lesion_classifier`` component to a
bundle with :func:`LiverTumorSegLib.bundle.extend_bundle`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from LiverTumorSegLib.radiomics_catalogue import FEATURE_NAMES, feature_settings, pyradiomics_version
from LiverTumorSegLib.radiomics_filter import COMPONENT, LesionClassifier

from .feature_selection import impute_nonfinite, select_features

log = logging.getLogger("livertumorseg_training")

RF_PARAMS = {"n_estimators": 350, "max_depth": 16, "min_samples_leaf": 10, "class_weight": "balanced"}
ONNX_TOLERANCE = 1e-5
ONNX_FILE = "lesion_classifier.onnx"
JSON_FILE = "lesion_classifier.json"
VALIDATION_FRACTION = 0.2
CASE_SPLIT_MIN_CASES = 5
#: Share of the validation tumours τ_rf must keep (see :func:`choose_tau`).
MIN_SENSITIVITY = 0.95


def make_random_forest(seed: int = 0, n_jobs: int = 1):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(**RF_PARAMS, random_state=seed, n_jobs=n_jobs)


def table1_models(seed: int = 0) -> dict:
    """The classifiers of the paper's Table 1 with their hyperparameters (each fitted on standardised features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    return {
        "Random Forest": (make_random_forest(seed), "n_trees = 350, max_depth = 16, min_samples_leaf = 10"),
        "SVM (RBF kernel)": (SVC(kernel="rbf", C=0.2, gamma=0.4, random_state=seed), "C = 0.2, γ = 0.4"),
        "SVM (linear kernel)": (SVC(kernel="linear", C=1.0, random_state=seed), "C = 1.0"),
        "Logistic Regression": (LogisticRegression(C=0.001, max_iter=5000), "penalty = L2, C = 0.001"),
    }


def _scores(model, X):
    if hasattr(model, "predict_proba"):
        return model.predict_proba(X)[:, 1]
    return model.decision_function(X)


def compare_classifiers(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated accuracy and AUC (mean ± std over folds) of the Table 1 classifiers."""
    from sklearn.base import clone
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    X, _ = impute_nonfinite(X)
    y = np.asarray(y).astype(int)
    folds = max(2, min(folds, int(np.bincount(y).min())))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    results = {}
    for name, (model, hyper) in table1_models(seed).items():
        accuracy, auc = [], []
        for train, test in splitter.split(X, y):
            mean, std = X[train].mean(axis=0), X[train].std(axis=0)
            std = np.where(std > 0, std, 1.0)
            fitted = clone(model).fit((X[train] - mean) / std, y[train])
            Xt = (X[test] - mean) / std
            accuracy.append(accuracy_score(y[test], fitted.predict(Xt)))
            auc.append(roc_auc_score(y[test], _scores(fitted, Xt)))
        results[name] = {
            "hyperparameters": hyper,
            "accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
            "auc_mean": float(np.mean(auc)), "auc_std": float(np.std(auc)),
            "folds": folds,
        }
    return results


def write_table1(results: dict, path: str | Path) -> Path:
    """Markdown table in the form of the paper's Table 1 (plus AUC)."""
    path = Path(path)
    folds = next(iter(results.values()))["folds"] if results else 0
    lines = [
        f"| Classification model | Key hyperparameters | CV accuracy ({folds}-fold) | CV AUC |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['hyperparameters']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
            f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def choose_tau(y_true: np.ndarray, probability: np.ndarray, min_sensitivity: float = MIN_SENSITIVITY) -> tuple[float, dict]:
    """τ_rf on validation data: the highest threshold that still keeps ``min_sensitivity`` of the true
    tumours, and the metrics there.

    The paper fixes τ_rf without saying how. A filter that drops a true tumour loses all of its Dice and a
    detection, while a kept false positive costs only its own voxels, so τ is held below nearly all true
    tumours rather than balancing both errors (Youden's J, reported, would drop more of them). Thresholds
    between two neighbouring validation scores classify the validation data alike: τ is the middle of the
    gap below the chosen score (a margin on both sides, not a threshold on the weakest kept tumour's score).
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=np.float64)
    scores = np.unique(probability)  # ascending; τ = scores[i] calls scores ≥ scores[i] tumour
    positives, negatives = max(int(y_true.sum()), 1), max(int((1 - y_true).sum()), 1)
    chosen = 0
    for i, tau in enumerate(scores):
        if (probability[y_true == 1] >= tau).sum() / positives >= min_sensitivity - 1e-12:
            chosen = i
    lower = scores[chosen - 1] if chosen > 0 else 0.0
    tau = float((scores[chosen] + lower) / 2)
    predicted = probability >= tau
    sensitivity = float(predicted[y_true == 1].sum() / positives)
    specificity = float((~predicted[y_true == 0]).sum() / negatives)
    metrics = {
        "auc": float(roc_auc_score(y_true, probability)) if len(np.unique(y_true)) == 2 else float("nan"),
        "min_sensitivity": float(min_sensitivity),
        "youden_j": sensitivity + specificity - 1,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "accuracy": float((predicted == (y_true == 1)).mean()),
        "samples": int(len(y_true)),
    }
    return tau, metrics


def export_onnx(model, n_features: int, path: str | Path, *, check_X: np.ndarray | None = None) -> Path:
    """skl2onnx export (float32 [N, n_features] → ``probabilities`` [N, 2]); checked against scikit-learn."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(
        model, initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3},
    )
    path = Path(path)
    path.write_bytes(onx.SerializeToString())
    if check_X is not None and len(check_X):
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.asarray(check_X, np.float32)
        onnx_p = session.run(["probabilities"], {"input": x})[0]
        difference = float(np.abs(onnx_p - model.predict_proba(x)).max())
        if difference > ONNX_TOLERANCE:
            raise RuntimeError(f"ONNX export of the lesion classifier differs from scikit-learn by {difference:.2e}")
    return path


def split_validation(case_ids: Sequence[str], y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train indices, validation indices, how): held-out cases, or stratified regions for < 5 cases."""
    case_ids = np.asarray(case_ids)
    unique = sorted(set(case_ids.tolist()))
    rng = np.random.default_rng(seed)
    if len(unique) >= CASE_SPLIT_MIN_CASES:
        n_val = max(1, int(round(VALIDATION_FRACTION * len(unique))))
        for _ in range(100):  # a validation set needs both classes
            validation_cases = set(rng.permutation(unique)[:n_val].tolist())
            val = np.isin(case_ids, list(validation_cases))
            if len(np.unique(y[val])) == 2 and len(np.unique(y[~val])) == 2:
                return np.flatnonzero(~val), np.flatnonzero(val), f"{n_val} held-out cases"
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(y)), test_size=VALIDATION_FRACTION, stratify=y, random_state=seed)
    return np.sort(train), np.sort(val), "stratified 20 % of the regions"


def fit_classifier(table, *, seed: int = 0, out_dir: str | Path | None = None, folds: int = 5) -> dict:
    """Selection, Table 1, the random forest and τ_rf from a :class:`SampleTable`; writes the ONNX + JSON.

    Returns a dict with the paths (``onnx``, ``json``), the metadata written to the JSON and the Table 1
    results. ``out_dir`` keeps the files (default: a temporary folder, for immediate use).
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="lesion-classifier-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(table.names)
    y = np.asarray(table.y).astype(int)
    if len(np.unique(y)) != 2:
        raise ValueError("the lesion classifier needs both true tumours and negatives in the training data")
    train, val, split = split_validation(table.case_ids, y, seed)
    started = time.perf_counter()
    selection = select_features(table.X[train], y[train], names, seed=seed)
    columns = [names.index(n) for n in selection.selected]
    X_train, _ = impute_nonfinite(table.X[train][:, columns], selection.mean)
    X_val, _ = impute_nonfinite(table.X[val][:, columns], selection.mean)
    Z_train = (X_train - selection.mean) / selection.std
    Z_val = (X_val - selection.mean) / selection.std
    table1 = compare_classifiers(X_train, y[train], folds=folds, seed=seed)
    write_table1(table1, out_dir / "table1.md")
    model = make_random_forest(seed).fit(Z_train.astype(np.float32), y[train])
    validation_p = model.predict_proba(Z_val.astype(np.float32))[:, 1]
    tau, validation = choose_tau(y[val], validation_p)
    onnx_path = export_onnx(model, len(columns), out_dir / ONNX_FILE, check_X=np.concatenate([Z_train, Z_val]))
    counts = table.counts()
    meta = {
        "feature_names": selection.selected,
        "mean": selection.mean.tolist(),
        "std": selection.std.tolist(),
        "tau_rf": tau,
        "tau_rule": f"highest threshold keeping {MIN_SENSITIVITY:.0%} of the validation tumours, middle of the score gap below",
        "settings": feature_settings(),
        "model": {"type": "RandomForestClassifier", **RF_PARAMS, "random_state": seed, "input": "standardised float32",
                  "output": "probabilities[:, 1] = true tumour"},
        "samples": {**counts, "train": int(len(train)), "validation": int(len(val)), "validation_split": split},
        "metrics": {"validation": validation, "cross_validation_table1": table1},
        "selection": selection.summary(),
        "pyradiomics_version": pyradiomics_version(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    json_path = out_dir / JSON_FILE
    json_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    # The engine's loader must accept what was written, and reproduce the forest's probabilities.
    loaded = LesionClassifier.from_files(onnx_path, json_path)
    return {"onnx": onnx_path, "json": json_path, "meta": meta, "table1": table1, "classifier": loaded, "model": model}


def add_to_bundle(bundle_dir: str | Path, onnx_path: str | Path, json_path: str | Path):
    """Add (or replace) the ``lesion_classifier`` component of a bundle; returns the new Bundle."""
    from LiverTumorSegLib.bundle import extend_bundle

    meta = json.loads(Path(json_path).read_text(encoding="utf-8"))
    component = {
        "file": ONNX_FILE,
        "features_file": JSON_FILE,
        "role": "radiomics false-positive filter: random forest on the selected radiomic features (skl2onnx)",
        "features": meta["feature_names"],
        "feature_settings": meta["settings"],
        "tau_rf": meta["tau_rf"],
    }
    updates = {"thresholds": {"tau_rf": meta["tau_rf"]}}
    if "validation" in meta.get("metrics", {}):
        updates["metrics"] = {"lesion_classifier_validation": meta["metrics"]["validation"]}
    return extend_bundle(bundle_dir, {COMPONENT: component}, {ONNX_FILE: Path(onnx_path), JSON_FILE: Path(json_path)},
                         manifest_updates=updates)


def train_lesion_classifier(
    dataset_dir: str | Path,
    bundle_dir: str | Path,
    *,
    cases: Sequence[str] | None = None,
    seed: int = 0,
    use_cascade_false_positives: bool = True,
    out_dir: str | Path = "runs/lesion_classifier",
    negative_ratio: float = 1.0,
    radii: Sequence[int] | None = None,
    threads: int = 1,
    progress: Callable[[str, float], None] | None = None,
    samples_from: str | Path | None = None,
) -> dict:
    """Train the radiomics classifier on a dataset and add it to the bundle at ``bundle_dir``.

    ``dataset_dir``: one folder, or several (ids ``FOLDER/ID``, :func:`datasets.find_cases_in`).
    ``cases``: training case ids (default: all cases of the dataset; pass the training fold's ids).
    With ``use_cascade_false_positives`` the bundle's cascade and the engine's post-processing run on each
    case and their false-positive components join the negatives. ``negative_ratio``: sampled negatives
    per annotated tumour; ``radii``: the negative balls' radii in pixels (default 2, 4, …, 48). ``out_dir`` receives the samples
    (``radiomics_samples.*``), ``table1.md``, the ONNX + JSON and ``summary.json``.
    ``samples_from``: a folder holding an earlier run's ``radiomics_samples.*``, refitted without extracting
    the features again (the dataset, cases and sampling options are then not used).
    Returns the summary (counts, selected features, τ_rf, metrics, Table 1).
    """
    from LiverTumorSegLib.bundle import load_bundle

    from .radiomics_samples import RADII, SampleTable, collect_samples

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(bundle_dir)
    started = time.perf_counter()
    if samples_from is not None:
        table = SampleTable.load(samples_from)
    else:
        table = collect_samples(
            dataset_dir, cases=cases, seed=seed, negative_ratio=negative_ratio, radii=radii or RADII, bundle=bundle,
            use_cascade_false_positives=use_cascade_false_positives, threads=threads, progress=progress,
        )
    table.save(out_dir)
    sampling_s = time.perf_counter() - started
    result = fit_classifier(table, seed=seed, out_dir=out_dir)
    add_to_bundle(bundle_dir, result["onnx"], result["json"])
    meta = result["meta"]
    summary = {
        "bundle": str(bundle_dir),
        "samples": meta["samples"],
        "selected_features": meta["feature_names"],
        "tau_rf": meta["tau_rf"],
        "validation": meta["metrics"]["validation"],
        "table1": result["table1"],
        "seconds": {"samples": round(sampling_s, 1), "fit": meta["seconds"]},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


__all__ = [
    "FEATURE_NAMES", "RF_PARAMS", "add_to_bundle", "choose_tau", "compare_classifiers", "export_onnx",
    "fit_classifier", "make_random_forest", "train_lesion_classifier", "write_table1",
]
