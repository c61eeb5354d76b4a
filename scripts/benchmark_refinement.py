"""Time the boundary refinement stage on a realistic synthetic case.

The case: a processing grid (1 mm in-plane, 2.5 mm slices by default) of 320 × 384 × 100 voxels holding a
body, a liver and five tumours of 10, 20, 30, 45 and 60 mm diameter. The network: by default a ``lite``
AlexNet-style boundary CNN with RANDOM weights, rewritten densely and exported to ONNX (the time does not
depend on the weights; the relabelled voxels do, so they mean nothing here); or the ``boundary_cnn`` of a
real bundle with ``--bundle``.

    python scripts/benchmark_refinement.py [--preset lite|paper] [--patch 11] [--threads N] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from LiverTumorSegLib.bundle import load_bundle, write_bundle
from LiverTumorSegLib.preprocess import InputContract, window_to_uint8
from LiverTumorSegLib.refinement import refine_boundaries

DIAMETERS_MM = (10, 20, 30, 45, 60)


def synthetic_case(slice_mm: float = 2.5, shape=(100, 320, 384), seed: int = 0):
    """uint8 intensities, labels (0/1/2) and spacing (x, y, z) of a body with a liver and five tumours."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z = (np.arange(nz) - nz / 2)[:, None, None] * slice_mm
    y = (np.arange(ny) - ny / 2)[None, :, None]
    x = (np.arange(nx) - nx / 2)[None, None, :]
    body = (y / 140.0) ** 2 + (x / 180.0) ** 2 <= 1
    liver_centre = (0.0, -10.0, -60.0)
    liver = ((z - liver_centre[0]) / 90.0) ** 2 + ((y - liver_centre[1]) / 95.0) ** 2 + ((x - liver_centre[2]) / 105.0) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0) + np.zeros(shape)
    hu[liver] = 110.0
    labels = liver.astype(np.uint8)
    centres = [(-45, -40, -110), (-20, 40, -100), (30, -50, -40), (20, 30, -20), (-10, -5, -80)]
    for (cz, cy, cx), diameter in zip(centres, DIAMETERS_MM):
        r = diameter / 2.0
        lesion = ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r) & liver
        hu[lesion] = 60.0
        labels[lesion] = 2
    hu += rng.normal(0, 12, shape)
    return window_to_uint8(hu.astype(np.float32), (-100.0, 400.0)), labels, (1.0, 1.0, slice_mm)


def random_weight_bundle(folder: Path, preset: str, patch: int) -> Path:
    import torch

    from livertumorseg_training.boundary_training import export_dense_onnx
    from livertumorseg_training.networks.boundary import alexnet3d

    torch.manual_seed(0)
    model = alexnet3d(preset, patch).eval()
    onnx_path = export_dense_onnx(model, folder / "boundary_cnn.onnx")
    entry = {"file": "boundary_cnn.onnx", "kind": "onnx", "patch_size": patch, "band_voxels": 6, "threshold": 0.5}
    manifest = {"name": f"benchmark ({preset}, random weights)", "version": "0", "input": InputContract().to_dict(),
                "components": {"boundary_cnn": entry}}
    return write_bundle(folder / "bundle", manifest, {"boundary_cnn.onnx": onnx_path}).path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a bundle with a boundary_cnn component (default: random-weight network)")
    parser.add_argument("--preset", default="lite", choices=["lite", "paper"])
    parser.add_argument("--patch", type=int, default=11)
    parser.add_argument("--slice-mm", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    intensities, labels, spacing = synthetic_case(args.slice_mm)
    print(f"case: grid {intensities.shape[::-1]} voxels (x, y, z), spacing {spacing} mm, tumours "
          f"{', '.join(f'{d} mm' for d in DIAMETERS_MM)}; {int((labels == 2).sum())} tumour voxels")
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle = load_bundle(args.bundle)
            print(f"network: boundary_cnn of {bundle.path} (patch {bundle.component('boundary_cnn')['patch_size']})")
        else:
            bundle = load_bundle(random_weight_bundle(Path(tmp), args.preset, args.patch))
            print(f"network: {args.preset} AlexNet-style boundary CNN, patch {args.patch}, RANDOM WEIGHTS "
                  "(timing only; the relabelled voxels are meaningless)")
        times, info = [], {}
        for _ in range(args.repeats):
            tic = time.perf_counter()
            _, info = refine_boundaries(intensities, labels, spacing, bundle, threads=args.threads)
            times.append(time.perf_counter() - tic)
    print(f"band voxels {info['band_voxels']}, candidates {info['candidate_voxels']}, boxes {info['boxes']}, "
          f"tiles {info['tiles']}; ONNX Runtime {info['network_seconds']:.2f} s of the last run")
    print(f"refinement time: min {min(times):.2f} s, median {statistics.median(times):.2f} s over {args.repeats} runs "
          f"(threads: {args.threads or 'all'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
