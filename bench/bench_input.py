"""Images/second of the training input pipeline, per CPU core, at 224 (issue 4).

    python bench/bench_input.py                      # 2048 JPEGs of ~500x375, 1 core and all cores
    python bench/bench_input.py --cores 1,2,4,8 --images 2048
    python bench/bench_input.py --smoke --json       # seconds (the test suite runs it)

The script writes ImageNet-sized JPEGs (500x375 or 375x500, quality 90, smooth random
content with noise, ~65 KB each; ILSVRC photos average ~110 KB) into a temporary folder, then
runs vgg_jax's real training pipeline over it (`input_pipeline.TrainIterator`, the
paper recipe of configs/imagenet.py: rescale to S, random 224 crop, flip, PCA colour
shift, mean subtraction) and times whole batches reaching NumPy. Each core count runs
in its own subprocess pinned to that many cores (sched_setaffinity, which tf.data's
autotuning respects), so "img/s per core" is what a host needs to feed one accelerator:
e.g. a GPU training VGG-16 at ~1,000 img/s needs 1000 / (img/s per core) cores.
Variants: S=256 with the fused JPEG decode+crop (default), the same decoding the whole
image, and scale jittering S in [256, 512] ("S=256-512 fused"); "aa" rows antialias the
resize (data.antialias=True). Each is compared, in the same run and on as many cores,
with a plain tf.data pipeline over the same files that uses the same resize ("vs plain").
Ours delivers uint8 crops (+ the colour shift's alphas), the plain one float32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    # The baselines: a plain tf.data pipeline a user would write over the same files,
    # with tf.image.resize's default (no antialiasing) and with antialias=True.
    "plain tf.data S=256": dict(plain=True, antialias=False),
    "plain tf.data S=256 aa": dict(plain=True, antialias=True),
    "S=256 fused": dict(s_min=256, s_max=256, fused_jpeg_crop=True),
    "S=256 fused aa": dict(s_min=256, s_max=256, fused_jpeg_crop=True, antialias=True),
    "S=256 full decode": dict(s_min=256, s_max=256, fused_jpeg_crop=False),
    "S=256-512 fused": dict(s_min=256, s_max=512, fused_jpeg_crop=True),
}


def write_jpegs(root: str, n: int, size=(375, 500), classes: int = 10, seed: int = 0) -> float:
    """n JPEGs in root/class_k/; returns the mean file size in KB."""
    import numpy as np
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        h, w = size if i % 4 else size[::-1]  # a quarter portrait, like photos
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC).filter(ImageFilter.SMOOTH)
        arr = np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3))
        d = os.path.join(root, f"class_{i % classes}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{i:05d}.jpg")
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        total += os.path.getsize(p)
    return total / n / 1024


def plain_pipeline(folder: str, s: int, size: int, batch: int, antialias: bool = False):
    """What a user writes with tf.data alone: list the files, decode the whole JPEG,
    resize so the smallest side is S, random crop, random flip, subtract the mean RGB,
    batch, prefetch (float32 out, as such pipelines usually end)."""
    import tensorflow as tf
    classes = sorted(os.listdir(folder))
    files = tf.data.Dataset.list_files(os.path.join(folder, "*", "*.jpg"), shuffle=True, seed=0)
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(classes), tf.range(len(classes), dtype=tf.int64)), -1)
    mean = tf.constant([123.68, 116.78, 103.94])

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        new = tf.cast(tf.round(hw * s / tf.reduce_min(hw)), tf.int32)
        image = tf.image.resize(image, new, antialias=antialias)
        image = tf.image.random_crop(image, (size, size, 3))
        image = tf.image.random_flip_left_right(image)
        label = table.lookup(tf.strings.split(path, os.sep)[-2])
        return image - mean, label

    ds = files.repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    it = ds.as_numpy_iterator()
    return (dict(image=x, label=y) for x, y in it)


def run_worker(a) -> dict:
    cores = int(a.worker_cores)
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    sys.path.insert(0, ROOT)
    from vgg_jax.configs import imagenet
    from vgg_jax import input_pipeline
    variant = VARIANTS[a.variant]
    if variant.get("plain"):
        it = plain_pipeline(a.folder, 256, a.image_size, a.batch, variant["antialias"])
    else:
        c = imagenet.get_config("D,256")
        c.data.update(variant, image_size=a.image_size)
        source = input_pipeline.folder_source(a.folder)
        it = input_pipeline.TrainIterator(source, c.data, a.batch, seed=0)
    for _ in range(a.warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(a.batches):
        batch = next(it)
        n += batch["image"].shape[0]
    dt = time.perf_counter() - t0
    assert batch["image"].shape == (a.batch, a.image_size, a.image_size, 3)
    per_image = sum(v[0].nbytes for v in batch.values())  # what goes to the device
    return dict(img_per_s=n / dt, cores=len(os.sched_getaffinity(0)), images=n,
                bytes_per_image=per_image, dtype=str(batch["image"].dtype))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="JPEGs to write")
    p.add_argument("--cores", default="", help="comma list; default: 1 and all cores")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=24, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + " | ".join(VARIANTS))
    p.add_argument("--folder", default="", help="use this image folder instead of writing one")
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for the tests")
    p.add_argument("--worker-cores", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.batch, a.batches, a.warmup, a.cores = 24, 8, 2, 1, "1"
        a.variants = "plain tf.data S=256,S=256 fused"
    return a


def main(argv=None):
    a = parse(argv)
    if a.worker_cores:
        print(json.dumps(run_worker(a)))
        return
    available = len(os.sched_getaffinity(0))
    cores = [int(c) for c in a.cores.split(",")] if a.cores else sorted({1, available})
    if max(cores) > available:
        raise SystemExit(f"asked for {max(cores)} cores; this process may use {available}")
    variants = [v.strip() for v in a.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder, kb = a.folder, None
        if not folder:
            folder = os.path.join(tmp, "jpegs")
            kb = write_jpegs(folder, a.images)
        needed = a.batch * (a.batches + a.warmup)
        rows = []
        for variant in variants:
            for k in cores:
                args = [sys.executable, os.path.abspath(__file__), "--worker-cores", str(k),
                        "--variant", variant, "--folder", folder, "--batch", str(a.batch),
                        "--batches", str(a.batches), "--warmup", str(a.warmup),
                        "--image-size", str(a.image_size)]
                out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(f"{variant} on {k} cores failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(dict(variant=variant, cores=r["cores"], img_per_s=r["img_per_s"],
                                 img_per_s_per_core=r["img_per_s"] / r["cores"],
                                 bytes_per_image=r["bytes_per_image"], dtype=r["dtype"]))
        # each pipeline against the plain one with the same resize, on as many cores
        base = {(r["cores"], VARIANTS[r["variant"]].get("antialias", False)): r["img_per_s"]
                for r in rows if VARIANTS[r["variant"]].get("plain")}
        for r in rows:
            v = VARIANTS[r["variant"]]
            key = (r["cores"], v.get("antialias", False))
            if key in base and (v.get("plain") or v["s_min"] == v["s_max"] == 256):
                r["vs_plain"] = r["img_per_s"] / base[key]  # the same S: same function
    result = dict(rows=rows, image_size=a.image_size, batch=a.batch, jpeg_kb=kb,
                  images_timed=a.batch * a.batches, epochs_over_folder=needed / max(a.images, 1))
    if a.json:
        print(json.dumps(result))
        return
    print(f"training pipelines -> {a.image_size}x{a.image_size} batches of {a.batch}"
          + (f"; {a.images} JPEGs, mean {kb:.0f} KB" if kb else f"; folder {folder}"))
    print(f"{'variant':<20} {'cores':>5} {'img/s':>9} {'img/s per core':>15} "
          f"{'vs plain':>9} {'bytes/img to device':>20}")
    for r in rows:
        ratio = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else "-"
        print(f"{r['variant']:<20} {r['cores']:>5} {r['img_per_s']:>9.0f} "
              f"{r['img_per_s_per_core']:>15.0f} {ratio:>9} "
              f"{r['bytes_per_image']:>13,} {r['dtype']:>6}")


if __name__ == "__main__":
    main()
