"""Dense evaluation at ImageNet scale: compiles and images/s over images of varied sizes.

    python bench/bench_eval.py                          # 500 JPEGs, VGG-16 at width 1/4, Q=256
    python bench/bench_eval.py --images 500 --width 0.25 --q 256 --protocol dense
    python bench/bench_eval.py --smoke --json           # seconds (the test suite runs it)

The script writes JPEGs whose sides are drawn uniformly from [--min-side, --max-side]
(ImageNet's photos vary like this: after rescaling to Q their long side takes hundreds of
values), builds a randomly initialised VGG (same weights every run) and runs the public
`vgg_jax.evaluate.evaluate` over the folder, as `vgg-jax evaluate` does. It counts XLA
compiles with a `jax.monitoring` listener (every backend compile, whatever triggered it)
and times the whole evaluation, compiles included, as a user waits for it.

To measure another version of vgg_jax (e.g. the one before a change) on the same images,
run this script with that version first on PYTHONPATH (a `git worktree` of it).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(root: str, n: int, min_side: int, max_side: int, seed: int = 0,
                 classes: int = 10) -> int:
    """n JPEGs with random sides in [min_side, max_side]; returns the distinct sizes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    sizes = set()
    for i in range(n):
        h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        sizes.add((h, w))
        small = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        d = os.path.join(root, f"class_{i % classes}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(
            os.path.join(d, f"{i:05d}.jpg"), quality=90)
    return len(sizes)


def run(a) -> dict:
    import jax
    from vgg_jax import evaluate, models
    model = models.create_model(a.arch, num_classes=10, width=a.width,
                                fc_widths=(a.fc, a.fc), init_scheme="glorot")
    variables = models.init_variables(model, jax.random.PRNGKey(0), 224)
    meta = dict(model={}, preprocessing=dict(mean=[123.68, 116.78, 103.94], std=[1.0] * 3,
                                             bgr=False, recipe="paper", image_size=224,
                                             eval_scale=a.q, channels=3))
    net = evaluate.Net(model=model, variables=variables, meta=meta)
    compiles = []
    listener = lambda event, secs, **k: compiles.append(secs) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    with tempfile.TemporaryDirectory() as tmp:
        distinct = write_images(tmp, a.images, a.min_side, a.max_side)
        kwargs = dict(progress=False)
        if "batch_size" in inspect.signature(evaluate.evaluate).parameters:
            kwargs["batch_size"] = a.batch_size
        t0 = time.perf_counter()
        r = evaluate.evaluate([net], tmp, None, a.protocol, [a.q], **kwargs)
        seconds = time.perf_counter() - t0
    return dict(arch=a.arch, width=a.width, q=a.q, protocol=a.protocol, images=r["images"],
                distinct_sizes=distinct, compiles=len(compiles),
                compile_s=round(sum(compiles), 2), seconds=round(seconds, 2),
                img_per_s=round(r["images"] / seconds, 2),
                vgg_jax=os.path.dirname(os.path.dirname(os.path.abspath(evaluate.__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--fc", type=int, default=1024, help="fc6/fc7 width")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--min-side", type=int, default=200)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--q", type=int, default=256)
    p.add_argument("--protocol", default="dense")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="12 images, width 1/16: seconds")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.smoke:
        a.images, a.width, a.fc, a.max_side = 12, 0.0625, 32, 320
    if ROOT not in sys.path:
        sys.path.append(ROOT)  # after any PYTHONPATH version being measured
    r = run(a)
    if a.json:
        print(json.dumps(r))
        return
    print(f"| {'images':>6} | {'distinct sizes':>14} | {'compiles':>8} | {'compile s':>9} | "
          f"{'total s':>8} | {'img/s':>6} |")
    print(f"| {r['images']:>6} | {r['distinct_sizes']:>14} | {r['compiles']:>8} | "
          f"{r['compile_s']:>9} | {r['seconds']:>8} | {r['img_per_s']:>6} |")
    print(f"{r['arch']} width {r['width']}, {r['protocol']} at Q={r['q']}, vgg_jax from "
          f"{r['vgg_jax']}")


if __name__ == "__main__":
    main()
