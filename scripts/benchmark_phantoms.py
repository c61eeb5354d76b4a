"""Benchmark: phantom generation time (full size, 512×512) for a few seeds.

    .venv/bin/python scripts/benchmark_phantoms.py [--seeds 0 1 2 3 4]
"""

import argparse
import time

from LiverTumorSegLib.phantoms import generate_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--size", default="full", choices=("full", "small"))
    args = parser.parse_args()
    for seed in args.seeds:
        start = time.perf_counter()
        phantom = generate_phantom(seed, size=args.size)
        seconds = time.perf_counter() - start
        print(f"seed {seed}: {phantom.image.array.shape[0]} slices of {phantom.image.array.shape[2]}×"
              f"{phantom.image.array.shape[1]}, {seconds:.1f} s")


if __name__ == "__main__":
    main()
