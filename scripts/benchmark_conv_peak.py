"""What ONNX Runtime can do on this machine: GFLOP/s of one plain 3×3 convolution, and the FLOPs of a model.

    .venv/bin/python scripts/benchmark_conv_peak.py [--channels 32] [--size 144 192] [--batch 8] [--threads N]
                                                    [--model FILE.onnx --input-size H W] [--compare-spinning]

The convolution runs through the engine's own session options (``bundle.session_options``), so its GFLOP/s
is the practical peak that the networks are compared with (``scripts/benchmark_pipeline.py``): a network of
such convolutions cannot run faster. The default size is that of the lite cascade's heaviest layers at a
typical body crop (32 channels at half of 288×384). FLOPs are counted as the training package's model
summary counts them (torch's FlopCounterMode): 2 per multiply-add of Conv, ConvTranspose, MatMul and Gemm,
other operations ignored; shapes come from ONNX shape inference. Needs ``onnx`` (the engine's test extra).

``--compare-spinning`` runs the bundled liver network with the engine's options and with spinning threads
(ONNX Runtime's default), alternately, and prints the median wall and CPU time per slice of each.
"""

from __future__ import annotations

import argparse
import time
from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from LiverTumorSegLib.bundle import load_bundle, session_options

#: Timed runs of the convolution after one warm-up run; the median is reported.
REPEATS = 7


@lru_cache(maxsize=None)
def model_flops(path: str, in_channels: int, height: int, width: int) -> int:
    """FLOPs of one (1, in_channels, height, width) input through the ONNX model at ``path``."""
    model = onnx.load(path)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, in_channels, height, width)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    model = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shapes = {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
              for info in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    shapes.update({tensor.name: list(tensor.dims) for tensor in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        first, second, out = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
        if not all(first + second + out):
            raise ValueError(f"{path}: shape inference left the shape of {node.op_type} '{node.name}' unknown")
        if node.op_type == "Conv":  # weight (out, in/group, kh, kw): every output value is one dot product
            total += 2 * int(np.prod(out)) * int(np.prod(second[1:]))
        elif node.op_type == "ConvTranspose":  # weight (in, out/group, kh, kw): every input value is scattered
            total += 2 * int(np.prod(first)) * int(np.prod(second[1:]))
        else:  # (…, M, K) × (K, N)
            transposed = any(a.name == "transA" and a.i for a in node.attribute)
            total += 2 * int(np.prod(out)) * (first[-2] if transposed else first[-1])
    return total


def conv_peak(channels: int = 32, height: int = 144, width: int = 192, batch: int = 8,
              threads: int | None = None) -> dict:
    """GFLOP/s (and GFLOP per CPU second, all threads) of ONNX Runtime on one 3×3 convolution (``channels`` in
    and out, padding 1), medians of :data:`REPEATS` runs, through the engine's session options."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.1, (channels, channels, 3, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(channels, np.float32), "bias")
    node = helper.make_node("Conv", ["input", "weight", "bias"], ["output"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "conv3x3",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, channels, height, width])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    feed = {"input": rng.uniform(0, 1, (batch, channels, height, width)).astype(np.float32)}
    session.run(None, feed)
    seconds, cpu_seconds = [], []
    for _ in range(REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    flops = 2 * batch * channels * channels * 9 * height * width
    return {"flops": flops, "seconds": float(np.median(seconds)), "gflop_per_s": flops / np.median(seconds) / 1e9,
            "gflop_per_cpu_s": flops / np.median(cpu_seconds) / 1e9, "shape": f"{batch}×{channels}×{height}×{width}"}


def compare_spinning(rounds: int = 5, batch: int = 8, height: int = 288, width: int = 384,
                     threads: int | None = None) -> None:
    """Median seconds per slice of the bundled liver network without (the engine's) and with spinning threads,
    run alternately so that a changing load on the machine affects both alike."""
    path = str(load_bundle().file("liver"))
    spinning = session_options(threads)
    ort.set_default_logger_severity(3)  # replacing the engine's entry is intended: no warning about it
    spinning.add_session_config_entry("session.intra_op.allow_spinning", "1")
    cpu_only = ["CPUExecutionProvider"]
    sessions = {"sleeping threads (engine)": ort.InferenceSession(path, session_options(threads), providers=cpu_only),
                "spinning threads": ort.InferenceSession(path, spinning, providers=cpu_only)}
    feed = {"input": np.random.default_rng(0).uniform(0, 255, (batch, 3, height, width)).astype(np.float32)}
    wall, cpu = {name: [] for name in sessions}, {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feed)
    for _ in range(rounds):
        for name, session in sessions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            session.run(None, feed)
            wall[name].append((time.perf_counter() - start) / batch)
            cpu[name].append((time.process_time() - start_cpu) / batch)
    print(f"liver network, {batch}×3×{height}×{width}, medians of {rounds} alternating runs:")
    for name in sessions:
        print(f"  {name:<28}{np.median(wall[name]) * 1000:8.1f} ms/slice wall"
              f"{np.median(cpu[name]) * 1000:8.1f} ms/slice CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(144, 192), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--model", default=None, help="also count the FLOPs of this ONNX model (N, C, H, W input)")
    parser.add_argument("--input-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--compare-spinning", action="store_true", help="A/B of ONNX Runtime's thread spinning")
    args = parser.parse_args()
    if args.compare_spinning:
        compare_spinning(threads=args.threads)
        return
    peak = conv_peak(args.channels, *args.size, args.batch, args.threads)
    print(f"3×3 convolution {peak['shape']}: {peak['flops'] / 1e9:.2f} GFLOP in {peak['seconds'] * 1000:.1f} ms "
          f"(median of {REPEATS}) = {peak['gflop_per_s']:.1f} GFLOP/s, "
          f"{peak['gflop_per_cpu_s']:.1f} GFLOP per CPU second")
    if args.model:
        channels = onnx.load(args.model).graph.input[0].type.tensor_type.shape.dim[1].dim_value
        flops = model_flops(args.model, channels, *args.input_size)
        print(f"{args.model}: {flops / 1e9:.3f} GFLOP per {args.input_size[0]}×{args.input_size[1]} slice")


if __name__ == "__main__":
    main()
