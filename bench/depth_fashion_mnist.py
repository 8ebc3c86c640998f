"""The paper's central finding (Table 3) at small scale on the real Fashion-MNIST: top-1
test error of each configuration under one recipe (configs/fashion_mnist_depth.py), the
same seeds for every configuration, beside the paper's ImageNet numbers.

    python bench/depth_fashion_mnist.py [--archs A,A-LRN,B,C,D,E] [--seeds 0,1] [--idx-dir DIR]
    python bench/depth_fashion_mnist.py --archs A,E --seeds 0 --limit 256   # a smoke run
    python bench/depth_fashion_mnist.py --init he --out runs/depth_he  # He fan-in everywhere
    python bench/depth_fashion_mnist.py --set train.num_epochs=6 --set train.dtype=bfloat16

`--init` draws every configuration's weights with another of models' init schemes
(the same one for all six, so the recipe stays one recipe); `--set KEY=VALUE` overrides
any other config value, for every run alike (train.py's `--config.KEY=VALUE`).

Each run is `train.py --config configs/fashion_mnist_depth.py:ARCH --config.seed=SEED` on
TFDS fashion_mnist prepared offline from the IDX files (`vgg-jax prepare fashion_mnist
--manual-dir DIR`; Debian's dataset-fashion-mnist installs them). Rows go to
OUT/depth.jsonl as runs finish (a long run in the background can be watched); a run whose
row is there already is not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = "/usr/share/datasets/fashion-mnist"
# Table 3 (S = 256, single scale): top-1 validation error on ImageNet, %.
PAPER_TOP1 = {"A": 29.6, "A-LRN": 29.7, "B": 28.7, "C": 28.1, "D": 27.0, "E": 27.3}
LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


def run(a, arch: str, seed: int, data_dir: str) -> dict:
    workdir = os.path.join(a.out, f"{arch}_seed{seed}")
    flags = [f"--config.seed={seed}", f"--config.data.data_dir={data_dir}",
             "--config.train.progress_bar=False"]
    if a.init:
        flags.append(f"--config.model.init_scheme={a.init}")
    if a.epochs:
        flags.append(f"--config.train.num_epochs={a.epochs}")
    if a.limit:  # the smoke run: a few steps, one evaluation at the end
        flags.append(f"--config.train.max_steps={a.limit // 128}")
    flags += [f"--config.{kv}" for kv in a.set]
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}",
                    "--config", os.path.join(ROOT, "configs", f"fashion_mnist_depth.py:{arch}"),
                    *flags], check=True, cwd=ROOT)
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [l for l in lines if "eval_top1_err" in l]
    rate = [l["train_images_per_sec"] for l in lines if "train_images_per_sec" in l]
    return dict(arch=arch, seed=seed, init=a.init or "glorot",
                steps=evals[-1]["step"] if evals else 0,
                top1_err=evals[-1]["eval_top1_err"] if evals else float("nan"),
                train_loss=[l["train_loss"] for l in lines if "train_loss" in l][-1],
                images_per_sec=float(np.median(rate)) if rate else float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="A,A-LRN,B,C,D,E")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=0, help="0: the config's")
    ap.add_argument("--init", default="", help="init scheme for every config "
                    "(he, kaiming, paper, ...); default: the config's (glorot)")
    ap.add_argument("--idx-dir", default=DEBIAN)
    ap.add_argument("--out", default=os.path.join("runs", "depth"))
    ap.add_argument("--limit", type=int, default=0, help="train on about N images only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, e.g. train.num_epochs=6")
    a = ap.parse_args()
    for kv in a.set:
        if "=" not in kv or kv.startswith("="):
            ap.error(f"--set {kv}: expected KEY=VALUE, e.g. --set train.num_epochs=6")
    if not os.path.isfile(os.path.join(a.idx_dir, "train-images-idx3-ubyte.gz")):
        sys.exit(f"depth_fashion_mnist.py: error: no Fashion-MNIST IDX files in {a.idx_dir} "
                 f"(apt-get install dataset-fashion-mnist, or --idx-dir DIR)")
    os.makedirs(a.out, exist_ok=True)
    data_dir = os.path.join(a.out, "tfds")
    subprocess.run(["vgg-jax", "prepare", "fashion_mnist", "--manual-dir", a.idx_dir,
                    "--data-dir", data_dir], check=True, capture_output=True)
    log = os.path.join(a.out, "depth.jsonl")
    done = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for arch in a.archs.split(","):
            row = next((r for r in done if (r["arch"], r["seed"]) == (arch, seed)), None)
            if row is None:
                row = run(a, arch, seed, data_dir)
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
            rows.append(row)
    print("\nconfig  layers  top-1 err % (per seed)    mean   | paper Table 3 top-1 %")
    for arch in a.archs.split(","):
        errs = [100 * r["top1_err"] for r in rows if r["arch"] == arch]
        print(f"{arch:<7} {LAYERS[arch]:>6}  {' '.join(f'{e:6.2f}' for e in errs):<24} "
              f"{np.mean(errs):6.2f} | {PAPER_TOP1[arch]:.1f}")


if __name__ == "__main__":
    main()
