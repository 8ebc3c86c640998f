"""Time to the first training batch after resuming part-way through an epoch of an image
folder: the pipeline's indexed entry (`Source.train_dataset(..., start)`) against reading
the epoch from its start and dropping what comes before (`.skip(offset)`, how it was done
before 2026-11-29), in the same run, on the same files.

    python bench/bench_resume.py [--images 50000] [--root DIR] [--json]

The folder (ROOT/CLASS/*.jpg, 10 classes of 48x48 JPEGs) is written on first use and kept.
Both sides run the same TrainIterator preprocessing (the 'small' recipe at 32x32, batch 64,
one process); the time runs from building the iterator to holding its first batch (best of
3, after one warm-up), so the train step's compile time (the same either way) is left out.
The files sit in the page cache after the first pass: on a cold disk or a network file
system each file read and dropped costs far more.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(root: str, images: int) -> None:
    import numpy as np
    from PIL import Image
    done = os.path.join(root, f".complete-{images}")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(0)
    for i in range(images):
        d = os.path.join(root, f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), np.uint8)).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(done, "w").close()


def first_batch_seconds(source, data, offset: int, read_and_drop: bool) -> float:
    from vgg_jax import input_pipeline
    it = input_pipeline.TrainIterator(source, data, 64, seed=0, state={"epoch": 0, "offset": offset})
    if read_and_drop:  # the epoch from position 0, the first `offset` examples read and dropped
        entry = source.train_dataset
        source.train_dataset = lambda e, s, start, block: entry(e, s, 0, block).skip(start)
    t0 = time.perf_counter()
    try:
        batch = next(iter(it))
    finally:
        if read_and_drop:
            source.train_dataset = entry
    assert batch["image"].shape[0] == 64
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--root", default=os.path.join("/tmp", "vgg_jax_bench_resume"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    root = os.path.join(a.root, str(a.images))
    write_folder(root, a.images)
    from vgg_jax.configs.default import get_config
    from vgg_jax import input_pipeline
    data = get_config().data
    source = input_pipeline.make_source(root, None)
    rows = []
    first_batch_seconds(source, data, 0, read_and_drop=False)  # warm-up: tf.data's first graph
    for fraction in (0.1, 0.9):
        offset = int(fraction * source.num_examples)
        indexed = min(first_batch_seconds(source, data, offset, read_and_drop=False)
                      for _ in range(3))
        dropped = min(first_batch_seconds(source, data, offset, read_and_drop=True)
                      for _ in range(3))
        rows.append(dict(position=f"{fraction:.0%}", offset=offset, indexed_s=round(indexed, 3),
                         read_and_drop_s=round(dropped, 3), ratio=round(dropped / indexed, 1)))
    if a.json:
        print(json.dumps(dict(images=source.num_examples, rows=rows)))
        return
    print(f"resume into an epoch of {source.num_examples} images (batch 64, 32x32 'small' recipe)")
    print(f"{'position':>8} {'offset':>7} {'indexed (s)':>12} {'read+drop (s)':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['position']:>8} {r['offset']:>7} {r['indexed_s']:>12.3f} "
              f"{r['read_and_drop_s']:>14.3f} {r['ratio']:>5.1f}x")


if __name__ == "__main__":
    main()
