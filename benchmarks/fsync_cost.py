"""What the fsyncs of ``atomic_write`` and of a checkpoint save cost, measured side by side.

Writes a file of ``--mb`` MiB (a checkpoint's size class) ``--repeats`` times to a temporary name in
``--dir`` and renames it into place, once with the ``fsync`` of the file and of its folder
(``crma_lightning.adapters.serialization.atomic_write``, what every run file and checkpoint now gets)
and once without, alternating, and prints the median of each and their ratio. A small report-sized
file is timed too. The cost depends on the disk, so run it on the file system of your run directories:

    python benchmarks/fsync_cost.py --dir runs/ --mb 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from crma_lightning.adapters.serialization import atomic_write


def _plain_write(path: Path, data: bytes) -> None:
    """The same steps as ``atomic_write`` without the two fsyncs (what it did before)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def measure(folder: Path, size: int, repeats: int) -> tuple[float, float]:
    data = os.urandom(size)
    target = folder / "bench.bin"
    synced, plain = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
        synced.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _plain_write(target, data)
        plain.append(time.perf_counter() - t0)
    target.unlink()
    return statistics.median(synced), statistics.median(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="folder on the file system to measure (default: a temp dir)")
    parser.add_argument("--mb", type=float, default=64.0, help="size of the large file in MiB (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="writes per variant (default 7)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"folder: {folder}")
        print("| file | with fsync (s) | without (s) | ratio |")
        print("|---|---|---|---|")
        for label, size in ((f"{args.mb:g} MiB", int(args.mb * 2**20)), ("4 KiB (report)", 4096)):
            synced, plain = measure(Path(folder), size, args.repeats)
            print(f"| {label} | {synced:.4f} | {plain:.4f} | {synced / plain:.2f} |")


if __name__ == "__main__":
    main()
