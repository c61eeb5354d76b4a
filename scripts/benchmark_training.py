"""Benchmark: training throughput of the cascade (both branches, forward + backward + Adam step), in tiles/s.

    .venv/bin/python scripts/benchmark_training.py [--preset lite] [--tile 224] [--batch 8] [--steps 6]

Compares the memory formats (NCHW and channels-last) and bfloat16 autocast on the CPU (float16 AMP on a
CUDA GPU when one is present), on random tiles of the training size; the first step is a warm-up. Run it on
an otherwise idle machine: the figures are only comparable within one run.
"""

import argparse
import statistics
import time

import torch

from livertumorseg_training.losses import CascadeLoss
from livertumorseg_training.networks import build_model


def tiles_per_second(preset: str, tile: int, batch: int, steps: int, channels_last: bool, autocast: bool,
                     device: torch.device) -> float:
    torch.manual_seed(0)
    model = build_model("cascade", preset).to(device)
    stack = torch.rand(batch, 3, tile, tile, device=device) * 255
    target = (torch.rand(batch, 1, tile, tile, device=device) > 0.7).float()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        stack = stack.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    criterion = CascadeLoss()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    times = []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            liver, tumour = model(stack)
        loss, _ = criterion(liver.float(), tumour.float(), target, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lite", choices=("lite", "paper"))
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cascade {args.preset}, {args.batch} tiles of {args.tile}² per step, {device}, "
          f"{torch.get_num_threads()} threads")
    baseline = None
    for channels_last in (False, True):
        for autocast in (False, True):
            rate = tiles_per_second(args.preset, args.tile, args.batch, args.steps, channels_last, autocast, device)
            baseline = baseline or rate
            print(f"  {'channels-last' if channels_last else 'NCHW':<14}{'autocast' if autocast else 'float32':<10}"
                  f"{rate:7.2f} tiles/s  ({rate / baseline:.2f}×)")


if __name__ == "__main__":
    main()
