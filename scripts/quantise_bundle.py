"""Static int8 quantisation of a cascade bundle's two networks, calibrated on CT slices, as a new bundle.

    .venv/bin/python scripts/quantise_bundle.py --bundle SRC --out DST --calibration FOLDER [FOLDER ...]
                                                [--cases N] [--slices N] [--exclude ID ...]
                                                [--method minmax|percentile]

Each network becomes a QDQ graph (weights int8 per output channel, activations uint8) with ONNX Runtime's
``quantize_static``. Calibration inputs are what the engine feeds the networks: for ``--cases`` cases of each
calibration folder (any training layout: phantoms, the real 8-bit scans, …), the engine's preprocessing, then
``--slices`` 3-slice stacks spread over the liver's slices and their neighbourhood, on a 320 mm tile around
the liver; the tumour network gets the
fp32 liver network's probability as its fourth channel, as in the engine.

The output bundle is a full bundle (checksums rewritten, ``model.quantisation`` recorded). Whether it may
replace the fp32 bundle is decided by measurement, not here: compare the two with
``livertumorseg-train evaluate --bundle fp32=SRC --bundle int8=DST ...`` (Dice) and
``scripts/benchmark_pipeline.py --bundle DST`` (speed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from LiverTumorSegLib.bundle import load_bundle, write_bundle
from LiverTumorSegLib.preprocess import crop_padded, prepare_volume, slice_stacks
from livertumorseg_training.datasets import find_cases, load_case

#: Calibration tiles' in-plane size (pixels of the 1 mm grid): large enough for whole-organ context, a multiple of
#: 64 for a 2 mm liver branch.
CALIBRATION_TILE = 320
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}


class StackReader(CalibrationDataReader):
    """Feeds prepared stacks one slice at a time (full body-crop slices, as the engine runs them)."""

    def __init__(self, input_name: str, stacks: list[np.ndarray]):
        self.input_name, self.stacks = input_name, iter(stacks)

    def get_next(self):
        stack = next(self.stacks, None)
        return None if stack is None else {self.input_name: stack}


def calibration_stacks(bundle, folders: list[str], cases: int, slices: int, exclude=(), seed: int = 0):
    """(liver inputs, tumour inputs): lists of (1, C, H, W) float32 arrays on the engine's processing grid."""
    rng = np.random.default_rng(seed)
    liver_session = bundle.session("liver")
    name = liver_session.get_inputs()[0].name
    liver_inputs, tumour_inputs = [], []
    for folder in folders:
        found = [case for case in find_cases(folder) if case.case_id not in exclude]
        for case in [found[i] for i in sorted(rng.choice(len(found), min(cases, len(found)), replace=False))]:
            image, labels = load_case(case)
            prepared = prepare_volume(image, bundle.contract, labels)
            liver_z = np.flatnonzero(prepared.labels.any(axis=(1, 2)))
            low, high = (max(liver_z.min() - 10, 0), min(liver_z.max() + 10, prepared.intensities.shape[0] - 1)) \
                if liver_z.size else (0, prepared.intensities.shape[0] - 1)
            # One tile size for every input (histogram calibration needs equal shapes), centred on the liver.
            centre = [int(np.mean(axis)) for axis in np.nonzero(prepared.labels.any(axis=0))] if liver_z.size \
                else [n // 2 for n in prepared.intensities.shape[1:]]
            crop = tuple(slice(c - CALIBRATION_TILE // 2, c + CALIBRATION_TILE // 2) for c in centre)
            tiles = crop_padded(prepared.intensities, crop)
            for z in np.unique(np.linspace(low, high, slices).astype(int)):
                stack = slice_stacks(tiles, np.array([z]), bundle.contract.stack_offsets)
                liver_inputs.append(stack)
                probability = liver_session.run(None, {name: stack})[0]
                tumour_inputs.append(np.concatenate([stack, probability], axis=1).astype(np.float32))
            print(f"calibration: {folder}: {case.case_id}")
    return liver_inputs, tumour_inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--calibration", nargs="+", required=True, help="labelled dataset folders")
    parser.add_argument("--cases", type=int, default=4, help="cases drawn from each calibration folder")
    parser.add_argument("--slices", type=int, default=12, help="slices per case")
    parser.add_argument("--exclude", nargs="*", default=[], help="case ids never used (the validation cases)")
    parser.add_argument("--method", choices=sorted(METHODS), default="percentile")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    liver_inputs, tumour_inputs = calibration_stacks(bundle, args.calibration, args.cases, args.slices, args.exclude)
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version", "files")}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for component, inputs in (("liver", liver_inputs), ("tumour", tumour_inputs)):
            source = bundle.file(component)
            prepared, target = Path(tmp) / f"pre-{source.name}", Path(tmp) / source.name
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(target), StackReader(bundle.component(component)["input"], inputs),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=METHODS[args.method])
            files[source.name] = target
        manifest["version"] = f"{manifest['version']}+int8"
        manifest["model"] = {**manifest["model"], "quantisation": {
            "format": "QDQ", "weights": "int8 per channel", "activations": "uint8", "method": args.method,
            "calibration": {"folders": [Path(f).name for f in args.calibration], "cases_per_folder": args.cases,
                            "slices_per_case": args.slices, "excluded": args.exclude}}}
        out = write_bundle(args.out, manifest, files, overwrite=True)
    print(f"int8 bundle written: {out.path}")
    print(json.dumps(manifest["model"]["quantisation"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
