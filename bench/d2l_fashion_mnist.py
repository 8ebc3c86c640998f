"""d2l's VGG experiment on the real Fashion-MNIST, vgg_jax beside the chapter's PyTorch code,
on the same cores, one command:

    python bench/d2l_fashion_mnist.py [--size 64] [--epochs 10] [--seed 0] [--idx-dir DIR] [--json]
    python bench/d2l_fashion_mnist.py --size 32 --epochs 1 --limit 256   # the CI smoke

vgg_jax: `train.py --config configs/fashion_mnist_vgg11_small.py` (plain SGD lr 0.05,
batch 128, Xavier init, [0, 1] pixels), data.dataset=fashion_mnist prepared offline from
the IDX files (`vgg-jax prepare fashion_mnist --manual-dir IDX_DIR`), at --size (the
chapter uses 224; the pool5 map feeds fc6 directly: model.classifier_pool = size / 32).
PyTorch: the chapter's network (VGG-11, channels / 4, two 4096-wide FC layers with dropout
0.5, Xavier-uniform weights), its train_ch6 loop (torch.optim.SGD(lr=0.05), cross entropy,
test accuracy after every epoch), channels_last, the same bilinear resize of the same
files. Both report test accuracy per epoch and training images per second (whole steps,
input included, evaluation excluded). Rows go to OUT/d2l.jsonl as they finish, so a long
run in the background can be watched (`tail -f`). --seed seeds both sides' weights, shuffle
and dropout (vgg_jax's config.seed; torch.manual_seed and the shuffle's generator);
`--set model.bias_init=zeros` (repeatable) passes a config override to vgg_jax's side.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = "/usr/share/datasets/fashion-mnist"


def read_idx(idx_dir: str, split: str):
    def read(stem, header):
        path = os.path.join(idx_dir, stem + ".gz")
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), np.uint8, offset=header)
    prefix = "train" if split == "train" else "t10k"
    labels = read(f"{prefix}-labels-idx1-ubyte", 8).astype(np.int64)
    images = read(f"{prefix}-images-idx3-ubyte", 16).reshape(len(labels), 28, 28)
    return images, labels


def log_row(out_dir: str, row: dict) -> None:
    with open(os.path.join(out_dir, "d2l.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run_torch(a, out_dir: str) -> list[dict]:
    """The chapter's network and train_ch6, on the CPU."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    xtr, ytr = read_idx(a.idx_dir, "train")
    xte, yte = read_idx(a.idx_dir, "test")
    if a.limit:
        xtr, ytr = xtr[:a.limit], ytr[:a.limit]

    def vgg_block(num_convs, in_channels, out_channels):
        layers = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            in_channels = out_channels
        return nn.Sequential(*layers, nn.MaxPool2d(2, 2))

    arch = [(n, c // 4) for n, c in ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))]
    blocks, channels = [], 1
    for n, c in arch:
        blocks.append(vgg_block(n, channels, c))
        channels = c
    side = a.size // 32
    net = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * side * side, 4096),
                        nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
                        nn.Dropout(0.5), nn.Linear(4096, 10))
    for m in net.modules():  # train_ch6's init_weights
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    def batches(x, y, shuffle, rng):
        order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            images = torch.from_numpy(x[idx]).float().div_(255).unsqueeze(1)  # ToTensor
            images = F.interpolate(images, size=(a.size, a.size), mode="bilinear",
                                   align_corners=False)  # Resize (upsampling)
            yield images.contiguous(memory_format=torch.channels_last), torch.from_numpy(y[idx])

    rows, rng = [], np.random.default_rng(a.seed)
    for epoch in range(1, a.epochs + 1):
        net.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for images, labels in batches(xtr, ytr, True, rng):
            opt.zero_grad()
            loss = F.cross_entropy(net(images), labels)
            loss.backward()
            opt.step()
            seen += len(labels)
            loss_sum += float(loss) * len(labels)
        train_s = time.perf_counter() - t0
        net.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in batches(xte, yte, False, rng):
                correct += int((net(images).argmax(1) == labels).sum())
        row = dict(side="pytorch", seed=a.seed, epoch=epoch, test_acc=correct / len(yte),
                   train_loss=loss_sum / seen, images_per_sec=seen / train_s,
                   epoch_train_s=train_s)
        log_row(out_dir, row)
        rows.append(row)
    return rows


def run_jax(a, out_dir: str) -> list[dict]:
    """train.py with the d2l config on TFDS fashion_mnist prepared from the IDX files."""
    data_dir = os.path.join(out_dir, "tfds")
    subprocess.run(["vgg-jax", "prepare", "fashion_mnist", "--manual-dir", a.idx_dir,
                    "--data-dir", data_dir], check=True, capture_output=True)
    workdir = os.path.join(out_dir, f"vgg_jax_{a.size}" + (f"_seed{a.seed}" if a.seed else ""))
    flags = [f"--config.seed={a.seed}", f"--config.data.data_dir={data_dir}", f"--config.data.image_size={a.size}",
             f"--config.model.classifier_pool={a.size // 32}",
             f"--config.train.num_epochs={a.epochs}", "--config.train.progress_bar=False",
             "--config.train.log_every_steps=20", "--config.train.checkpoint_every_steps=100000"]
    flags += [f"--config.{kv}" for kv in a.set]
    if a.limit:  # a part of the training split (the smoke run): steps from the limit
        flags.append(f"--config.train.max_steps={a.epochs * (a.limit // 128)}")
        flags.append("--config.train.eval_every_epochs=1000")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}",
                    "--config", os.path.join(ROOT, "configs", "fashion_mnist_vgg11_small.py"),
                    *flags], check=True, env=env, cwd=ROOT)
    return jax_rows(workdir, out_dir, a.seed)


def jax_rows(workdir: str, out_dir: str, seed: int = 0) -> list[dict]:
    """vgg_jax's rows from train.py's metrics.jsonl: test accuracy after each epoch, and
    the median training speed over that epoch's logged windows."""
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    steps_per_epoch = 60_000 // 128
    rows = []
    evals = [l for l in lines if "eval_top1_acc" in l]
    for i, e in enumerate(evals, start=1):
        window = [l["train_images_per_sec"] for l in lines if "train_images_per_sec" in l
                  and (i - 1) * steps_per_epoch < l["step"] <= i * steps_per_epoch]
        rate = float(np.median(window)) if window else float("nan")
        row = dict(side="vgg_jax", seed=seed, epoch=i, test_acc=e["eval_top1_acc"],
                   images_per_sec=rate, epoch_train_s=60_000 / rate)
        log_row(out_dir, row)
        rows.append(row)
    if not evals:  # the smoke run: training speed only
        rate = float(np.median([l["train_images_per_sec"] for l in lines
                                if "train_images_per_sec" in l]))
        rows.append(dict(side="vgg_jax", epoch=0, test_acc=float("nan"), images_per_sec=rate))
    return rows


D2L_PUBLISHED = 0.92  # the chapter's run at 224x224 ends near this test accuracy


def plot(out_dir: str, size: int) -> str:
    """Test accuracy per epoch of both sides (OUT/d2l.jsonl) beside d2l's published final
    accuracy, as OUT/d2l_curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "d2l.jsonl"))]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for side, style in (("vgg_jax", "o-"), ("pytorch", "s--")):
        pts = sorted((r["epoch"], r["test_acc"]) for r in rows if r["side"] == side)
        if pts:
            ax.plot(*zip(*pts), style, label=f"{side} (epoch {pts[-1][0]}: {pts[-1][1]:.4f})")
    ax.axhline(D2L_PUBLISHED, color="grey", lw=1, ls=":",
               label=f"d2l's published run at 224x224 (~{D2L_PUBLISHED})")
    ax.set(xlabel="epoch", ylabel="test accuracy",
           title=f"d2l VGG-11/4 on Fashion-MNIST at {size}x{size}, plain SGD lr 0.05")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path = os.path.join(out_dir, "d2l_curves.png")
    fig.tight_layout()
    fig.savefig(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--idx-dir", default=DEBIAN)
    ap.add_argument("--out", default=os.path.join("runs", "d2l"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for vgg_jax's side, e.g. model.bias_init=zeros")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images only")
    ap.add_argument("--side", choices=("both", "pytorch", "vgg_jax"), default="both")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", action="store_true",
                    help="draw OUT/d2l.jsonl's curves to OUT/d2l_curves.png and stop")
    ap.add_argument("--collect", metavar="WORKDIR",
                    help="add the vgg_jax rows of a finished train.py WORKDIR to OUT/d2l.jsonl "
                    "and stop (a run whose bench process was stopped)")
    a = ap.parse_args()
    if a.collect:
        jax_rows(a.collect, a.out, a.seed)
        return
    if a.plot:
        print(f"wrote {plot(a.out, a.size)}")
        return
    if not os.path.isfile(os.path.join(a.idx_dir, "train-images-idx3-ubyte.gz")):
        sys.exit(f"d2l_fashion_mnist.py: error: no Fashion-MNIST IDX files in {a.idx_dir} "
                 f"(apt-get install dataset-fashion-mnist, or --idx-dir DIR)")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    if a.side in ("both", "vgg_jax"):
        rows += run_jax(a, a.out)
    if a.side in ("both", "pytorch"):
        rows += run_torch(a, a.out)
    if a.json:
        print(json.dumps(rows))
        return
    print(f"\nd2l VGG-11/4 on Fashion-MNIST at {a.size}x{a.size}, {a.epochs} epochs")
    print(f"{'side':<8} {'epoch':>5} {'test acc':>9} {'train img/s':>12}")
    for r in rows:
        print(f"{r['side']:<8} {r['epoch']:>5} {r['test_acc']:>9.4f} {r['images_per_sec']:>12.1f}")


if __name__ == "__main__":
    main()
