"""Benchmark of the radiomics false-positive filter: seconds per volume with 30 candidate lesions.

A synthetic liver (portal-venous HU, noise, a few vessels) on the engine's processing grid (1 mm in-plane,
2.5 mm slices) holds 30 lesions of mixed sizes, 3–40 mm across. A random forest in the exported form
(skl2onnx → ONNX Runtime) is trained on random values for 20 features; only those features are
extracted for each candidate. The default selection is spread over the shape, original, boundary and
wavelet groups, the kind of set the selection produces; ``--features`` reads the names from a trained
``lesion_classifier.json`` instead.

    python scripts/benchmark_radiomics.py [--threads 2] [--executor process|thread|serial] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LiverTumorSeg"))

from LiverTumorSegLib.radiomics_catalogue import feature_settings  # noqa: E402
from LiverTumorSegLib.radiomics_filter import LesionClassifier, filter_lesions  # noqa: E402

SPACING = (1.0, 1.0, 2.5)
DEFAULT_FEATURES = [
    "original_shape_Sphericity", "original_shape_VoxelVolume",
    "original_firstorder_Mean", "original_firstorder_90Percentile", "original_glcm_Idmn", "original_glrlm_RunPercentage",
    "original_gradient_Mean", "original_histogram_Percentile05",
    "boundary_firstorder_Mean", "boundary_glcm_Contrast", "boundary_gradient_StandardDeviation",
    "wavelet-LLL_firstorder_Median", "wavelet-LLL_glcm_JointEnergy", "wavelet-HHH_firstorder_Variance",
    "wavelet-LLH_glrlm_LongRunEmphasis", "wavelet-HLL_glcm_Correlation", "wavelet-LHL_firstorder_Skewness",
    "wavelet-HHL_gradient_Mean", "wavelet-LHH_moments_J1", "original_moments_J2",
]


def synthetic_volume(seed: int = 0, lesions: int = 30):
    """(hu int16, labels uint8) (z, y, x) with a liver and ``lesions`` tumours of 3–40 mm."""
    rng = np.random.default_rng(seed)
    shape = (72, 256, 256)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    zc, yc, xc = (z * SPACING[2] - 90), (y - 128.0), (x - 128.0)
    liver = (xc / 105) ** 2 + (yc / 85) ** 2 + (zc / 80) ** 2 <= 1
    hu = np.full(shape, 40.0, np.float32)  # soft tissue around the liver
    hu[liver] = 110.0
    vessels = liver & ((np.abs(yc - 0.3 * xc) < 3) | (np.abs(xc + 0.2 * zc - 20) < 2.5))
    hu[vessels] = 170.0
    labels = liver.astype(np.uint8)
    diameters = np.linspace(3, 40, lesions)[rng.permutation(lesions)]
    placed = []
    for d in diameters:
        r = d / 2
        for _ in range(500):
            c = np.array([rng.uniform(-60, 60), rng.uniform(-70, 70), rng.uniform(-85, 85)])  # z, y, x mm
            inside = (c[2] / 105) ** 2 + (c[1] / 85) ** 2 + (c[0] / 80) ** 2 <= (1 - (r + 4) / 80) ** 2
            if inside and all(np.linalg.norm(c - p) > r + q + 3 for p, q in placed):
                placed.append((c, r))
                break
        else:
            raise RuntimeError("could not place all lesions")
        ball = (zc - c[0]) ** 2 + (yc - c[1]) ** 2 + (xc - c[2]) ** 2 <= r * r
        if not ball.any():  # a 3 mm lesion between slices: keep its centre voxel
            ball = np.zeros(shape, bool)
            ball[int(round((c[0] + 90) / SPACING[2])), int(round(c[1] + 128)), int(round(c[2] + 128))] = True
        hu[ball] = rng.uniform(40, 80)
        labels[ball] = 2
    hu += rng.normal(0, 12, shape).astype(np.float32)
    return np.rint(hu).astype(np.int16), labels


def random_classifier(names, folder: Path, seed: int = 0) -> LesionClassifier:
    """A real random forest (ONNX) over ``names``, trained on random data: it accepts about half the lesions."""
    from sklearn.ensemble import RandomForestClassifier
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((200, len(names))).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    model = RandomForestClassifier(n_estimators=50, max_depth=6, random_state=seed).fit(X, y)
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, len(names)]))],
                          options={id(model): {"zipmap": False}})
    (folder / "c.onnx").write_bytes(onx.SerializeToString())
    meta = {"feature_names": list(names), "mean": [0.0] * len(names), "std": [1.0] * len(names), "tau_rf": 0.5,
            "settings": feature_settings()}
    (folder / "c.json").write_text(json.dumps(meta))
    return LesionClassifier.from_files(folder / "c.onnx", folder / "c.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--executor", default="auto", choices=["auto", "process", "thread", "serial"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--features", type=Path, help="lesion_classifier.json whose feature names to extract")
    args = parser.parse_args(argv)
    names = json.loads(args.features.read_text())["feature_names"] if args.features else DEFAULT_FEATURES
    hu, labels = synthetic_volume()
    with tempfile.TemporaryDirectory() as folder:
        classifier = random_classifier(names, Path(folder))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            _, kept, info = filter_lesions(hu, labels, SPACING, classifier, threads=args.threads, executor=args.executor)
            times.append(time.perf_counter() - start)
    print(
        f"radiomics filter: {info['candidates']} candidates, {len(names)} features, executor={info['executor']} "
        f"workers={info['workers']}: {min(times):.2f} s per volume (best of {args.repeat}; all: "
        + ", ".join(f"{t:.2f}" for t in times) + ")"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
