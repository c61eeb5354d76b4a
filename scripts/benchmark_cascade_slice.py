"""Benchmark: per-slice inference time of one cascade branch, PyTorch eager vs ONNX Runtime, on CPU.

    .venv/bin/python scripts/benchmark_cascade_slice.py [--preset lite] [--size 224] [--repeats 20]

Exports the branch of a freshly built model (the weights do not change the cost), then times a batch of one
slice at 1 and 2 threads in both runtimes and prints the median.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from livertumorseg_training.networks import build_model
from livertumorseg_training.onnx_export import export_branch_onnx


def _median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lite", choices=("lite", "paper"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    branch = build_model("cascade", args.preset).liver.eval()
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, args.size, args.size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_branch_onnx(branch, 3, Path(tmp) / "liver.onnx")
        print(f"liver branch, preset {args.preset}, one {args.size}×{args.size} slice, median of {args.repeats}:")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                torch_ms = _median_ms(lambda: torch.sigmoid(branch(torch.from_numpy(x))), args.repeats)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            ort_ms = _median_ms(lambda: session.run(None, {"input": x}), args.repeats)
            print(f"  {threads} thread(s): torch {torch_ms:7.1f} ms   onnxruntime {ort_ms:7.1f} ms   "
                  f"({torch_ms / ort_ms:.1f}× faster)")


if __name__ == "__main__":
    main()
