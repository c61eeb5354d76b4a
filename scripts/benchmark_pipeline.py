"""Benchmark: segment a full-size phantom (512×512, ≥ 150 slices) with a bundle and explain the time.

    .venv/bin/python scripts/benchmark_pipeline.py [--bundle DIR] [--seed S] [--threads N] [--batch-size B]
                                                   [--slices N] [--slicer]

Prints per pipeline stage its seconds, CPU seconds (all threads) and peak resident memory; for the two
networks the slices they ran on, their FLOPs (counted from the ONNX graphs), the seconds inside ONNX Runtime
and the GFLOP/s reached, next to the GFLOP/s ONNX Runtime reaches on one plain 3×3 convolution with the same
session options (the practical peak, ``scripts/benchmark_conv_peak.py``); then the time to write the outputs.
GFLOP per CPU second (both for the networks and the convolution) compares the two even on a busy machine,
where the wall-clock rates depend on the share of the cores the process gets.

``--slices N`` extends the phantom along z to N slices (mirrored copies of itself, same spacing), e.g.
``--slices 1000`` for a long scan. ``--slicer`` adds what the Slicer module does around the engine, with
slicer-core's MRML outside the application: writing the volume node for the background process, the
process's imports, and reading the outputs back into segmentation and table nodes with closed surfaces.

Peak memory per stage is the process's resident high-water mark from the stage's start (Linux, reset through
``/proc/self/clear_refs``); it includes the input image the caller holds.
Issue targets (2 idle cores, shipped model, 512×512×~250): pipeline ≤ 12 s, ≤ 2 GB; 1000 slices ≤ 4 GB.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmark_conv_peak import conv_peak, model_flops

from LiverTumorSegLib.bundle import load_bundle
from LiverTumorSegLib.image_io import Image
from LiverTumorSegLib.phantoms import generate_phantom
from LiverTumorSegLib.pipeline import PipelineOptions, segment, write_outputs

#: The cascade's network components (2D slice stacks in, probabilities out).
NETWORKS = ("liver", "tumour")
GB = 2**30


def _high_water_mark() -> int:
    """The process's peak resident memory (bytes) since the last :func:`_reset_high_water_mark`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class StageMonitor:
    """Progress callback that records the CPU seconds and the peak resident memory between consecutive
    progress stages."""

    def __init__(self):
        self.segments: list[tuple[str, float, int]] = []
        self._stage = None
        self._cpu = time.process_time()
        _reset_high_water_mark()

    def __call__(self, stage: str, fraction: float) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage

    def close(self) -> None:
        cpu = time.process_time()
        if self._stage is not None:
            self.segments.append((self._stage, cpu - self._cpu, _high_water_mark()))
        self._stage, self._cpu = None, cpu
        _reset_high_water_mark()

    def per_step(self, steps) -> dict[str, tuple[float, int]]:
        """(CPU seconds, peak bytes) per pipeline step; the progress stages inside a step (e.g. "liver network")
        count for it."""
        totals, step = {}, None
        for stage, cpu, peak in self.segments:
            step = stage if stage in steps else step
            if step is not None:
                step_cpu, step_peak = totals.get(step, (0.0, 0))
                totals[step] = (step_cpu + cpu, max(step_peak, peak))
        return totals


class TimedSession:
    """An ONNX Runtime session that records the input shape, the seconds and the CPU seconds of every run."""

    def __init__(self, session, calls: list):
        self._session, self._calls = session, calls

    def run(self, outputs, feed):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = self._session.run(outputs, feed)
        self._calls.append((next(iter(feed.values())).shape, time.perf_counter() - start,
                            time.process_time() - start_cpu))
        return result

    def __getattr__(self, name):
        return getattr(self._session, name)


def time_network_runs(bundle) -> dict[str, list]:
    """Make ``bundle`` hand out :class:`TimedSession` for its networks; returns component → recorded runs."""
    calls = {component: [] for component in NETWORKS}
    plain = bundle.session

    def session(component, **options):
        made = plain(component, **options)
        return TimedSession(made, calls[component]) if component in calls else made

    bundle.session = session
    return calls


def long_scan(image: Image, slices: int) -> Image:
    """``image`` extended (or cut) along z to ``slices`` slices by mirrored copies of itself."""
    extra = max(0, slices - image.array.shape[0])
    array = np.pad(image.array, ((0, extra), (0, 0), (0, 0)), mode="symmetric")[:slices]
    return Image(array, image.geometry)


def print_networks(bundle, calls: dict, peak: dict) -> None:
    print(f"networks; practical peak: 3×3 convolution {peak['shape']} at {peak['gflop_per_s']:.1f} GFLOP/s, "
          f"{peak['gflop_per_cpu_s']:.1f} GFLOP per CPU second")
    print(f"  {'branch':<8}{'slices':>7}{'input H×W':>12}{'GFLOP':>8}{'seconds':>9}{'GFLOP/s':>9}{'of peak':>9}"
          f"{'GFLOP/CPU s':>13}{'of peak':>9}")
    for component, runs in calls.items():
        if not runs:
            print(f"  {component:<8}{'not run':>7}")
            continue
        path = str(bundle.file(component))
        flops = sum(shape[0] * model_flops(path, *shape[1:]) for shape, _, _ in runs)
        rate = flops / sum(seconds for _, seconds, _ in runs) / 1e9
        cpu_rate = flops / sum(cpu for _, _, cpu in runs) / 1e9
        sizes = ", ".join(sorted({f"{shape[2]}×{shape[3]}" for shape, _, _ in runs}))
        print(f"  {component:<8}{sum(shape[0] for shape, _, _ in runs):>7}{sizes:>12}{flops / 1e9:>8.1f}"
              f"{sum(seconds for _, seconds, _ in runs):>9.2f}{rate:>9.1f}{rate / peak['gflop_per_s']:>9.0%}"
              f"{cpu_rate:>13.1f}{cpu_rate / peak['gflop_per_cpu_s']:>9.0%}")


def slicer_path(image: Image, result, folder: Path) -> None:
    """What the Slicer module adds around the engine, timed with slicer-core outside the application."""
    from LiverTumorSegLib import mrml_nodes
    from LiverTumorSegLib.image_io import read_image
    from LiverTumorSegLib.scene_run import load_results, write_volume_node

    scene = mrml_nodes.create_scene()
    volume = mrml_nodes.volume_node_from_image(scene, image, name="CT")
    timings = {}
    start = time.perf_counter()
    write_volume_node(scene, volume, folder / "input.nrrd")
    timings["write the volume node (uncompressed NRRD)"] = time.perf_counter() - start
    start = time.perf_counter()
    imports = "import LiverTumorSegLib.cli, LiverTumorSegLib.pipeline, onnxruntime"
    subprocess.run([sys.executable, "-c", imports], check=True)
    timings["background process: start and imports"] = time.perf_counter() - start
    start = time.perf_counter()
    read_image(folder / "input.nrrd")
    timings["background process: read the volume"] = time.perf_counter() - start
    start = time.perf_counter()
    load_results(scene, folder / "outputs", volume)
    timings["read the outputs into nodes, closed surfaces"] = time.perf_counter() - start
    segmentation = mrml_nodes.segmentation_node_from_labels(scene, result.labels, volume, name="timing")
    start = time.perf_counter()
    mrml_nodes.add_closed_surfaces(segmentation)
    timings["  of which the closed surfaces"] = time.perf_counter() - start
    print("Slicer module around the engine (slicer-core MRML)")
    for step, seconds in timings.items():
        print(f"  {step:<46}{seconds:8.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=PipelineOptions().batch_size)
    parser.add_argument("--min-slices", type=int, default=150)
    parser.add_argument("--slices", type=int, default=None, help="extend the phantom to this many slices")
    parser.add_argument("--slicer", action="store_true", help="also time the Slicer module's steps around the engine")
    args = parser.parse_args()
    seed = args.seed
    while True:  # the first seed at or after --seed whose phantom has enough slices
        image = generate_phantom(seed, size="full").image
        if image.array.shape[0] >= args.min_slices:
            break
        seed += 1
    if args.slices:
        image = long_scan(image, args.slices)
    bundle = load_bundle(args.bundle)
    shape = image.array.shape
    print(f"phantom seed {seed}: {shape[2]}×{shape[1]}×{shape[0]} voxels, spacing "
          f"{tuple(round(s, 3) for s in image.geometry.spacing)} mm; bundle {bundle.name}; batch {args.batch_size}")
    print(f"peak RSS while the phantom was made: {_high_water_mark() / GB:.2f} GB")
    peak = conv_peak(threads=args.threads)
    calls = time_network_runs(bundle)
    monitor = StageMonitor()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = segment(image, bundle, PipelineOptions(threads=args.threads, batch_size=args.batch_size), progress=monitor)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    monitor.close()
    timings = result.details["timings_s"]
    steps = monitor.per_step(timings)
    print(f"  {'stage':<22}{'seconds':>8}{'CPU s':>8}{'peak RSS':>11}")
    for stage, seconds in timings.items():
        cpu, peak_bytes = steps.get(stage, (0.0, 0))
        print(f"  {stage:<22}{seconds:8.2f}{cpu:8.2f}{peak_bytes / GB:>8.2f} GB")
    print(f"  {'segment (total)':<22}{total:8.2f}{total_cpu:8.2f}{max(p for _, p in steps.values()) / GB:>8.2f} GB")
    with tempfile.TemporaryDirectory() as folder:
        start, start_cpu = time.perf_counter(), time.process_time()
        write_outputs(result, image, Path(folder) / "outputs")
        print(f"  {'write outputs':<22}{time.perf_counter() - start:8.2f}{time.process_time() - start_cpu:8.2f}"
              f"{_high_water_mark() / GB:>8.2f} GB")
        print_networks(bundle, calls, peak)
        if args.slicer:
            slicer_path(image, result, Path(folder))


if __name__ == "__main__":
    main()
