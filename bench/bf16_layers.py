"""bfloat16 layer by layer (issue 30): where vgg_jax's bf16 compute stands against PyTorch's
CPU autocast, for each distinct layer of VGG-16, in training and in inference.

    python bench/bf16_layers.py [--mode train] [--image-size 32] [--batch 128] [--repeats 3]
    python bench/bf16_layers.py --mode infer --image-size 224 --batch 8
    python bench/bf16_layers.py --smoke        # VGG-11, width 1/16, batch 2: seconds

Each conv layer at its place in the network (its input shape), and the FC head:
- vgg_jax: `conv.conv_layer(x, kernel, 'auto', train=...)` under `jax.jit`, the layer the
  model runs (in bf16, 'auto' picks for bf16 inputs), as the model computes it: inputs and
  kernel cast to the compute dtype, float32 kernel kept (the cast is in the timed
  function). Training times the forward and both gradients (`jax.vjp`), inference the
  forward. Also XLA's own conv in bf16 ('xla'), and the same 'auto' layer in float32.
- PyTorch: `nn.Conv2d` (channels_last, float32 weights) under `torch.autocast("cpu",
  bfloat16)`, forward + backward of both, or forward under no_grad; and in float32.
A ReLU follows each conv on both sides (what the network runs). The FC head is fc6-fc8
with ReLUs (no dropout, so both sides compute the same function), from pool5 flattened.
Milliseconds are the best of --repeats after a warm-up; then bf16 vgg_jax (the faster of
auto and xla) against torch autocast, as a speed ratio (> 1: vgg_jax faster), and the
first call's seconds of each side in f32 and bf16 (vgg_jax: tracing and XLA's compile plus
one run; PyTorch: oneDNN's primitive creation plus one run), with their sum over the
distinct layers. Prints a table, or JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(f, repeats) -> tuple[float, float]:
    """(seconds of the first call: for vgg_jax tracing and compiling plus one run, for
    PyTorch creating oneDNN's primitives plus one run; best ms of the next `repeats`)."""
    t0 = time.perf_counter()
    f()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return first, 1e3 * min(times)


def layers(arch, size, width):
    """[(label, (h, cin, cout), times in the net)] for each distinct conv, then pool5's
    flattened size."""
    from vgg_jax import models
    seen = {}
    for _, (h, _), cin, cout in models.conv_inputs(arch, size, width=width):
        seen[(h, cin, cout)] = seen.get((h, cin, cout), 0) + 1
    convs = [(f"conv {h}x{h} {ci}->{co}", (h, ci, co), n) for (h, ci, co), n in seen.items()]
    return convs, cout * models.pool5_side(size) ** 2


def jax_layer(shape, batch, dtype, impl, train):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vgg_jax import conv
    h, cin, cout = shape
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(batch, h, h, cin)), jnp.float32).astype(dtype)
    k = jnp.asarray(r.normal(size=(3, 3, cin, cout)) * (2 / (9 * cin)) ** 0.5, jnp.float32)

    def layer(x, k):
        return jax.nn.relu(conv.conv_layer(x, k.astype(dtype), impl, train=train))
    return timed_jax(layer, (x, k), train)


def jax_head(fc, batch, dtype, train):
    import jax
    import jax.numpy as jnp
    import numpy as np
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(batch, fc)), jnp.float32).astype(dtype)
    ws = [jnp.asarray(r.normal(size=s) * 0.01, jnp.float32)
          for s in ((fc, 4096), (4096, 4096), (4096, 1000))]

    def head(x, *ws):
        for w in ws[:2]:
            x = jax.nn.relu(x @ w.astype(dtype))
        return x @ ws[2].astype(dtype)
    return timed_jax(head, (x, *ws), train)


def timed_jax(fn, args, train):
    """A call of `jax.jit` of fn (train: its forward and the gradients of all its
    arguments, `jax.vjp`) on args that waits for the result."""
    import jax
    import jax.numpy as jnp

    def fwd_bwd(*xs):
        y, vjp = jax.vjp(fn, *xs)
        return vjp(jnp.ones_like(y))
    g = jax.jit(fwd_bwd if train else fn)
    return lambda: jax.block_until_ready(g(*args))


def torch_module(module, x, dtype, train):
    import torch
    autocast = dtype == "bfloat16"

    def run():
        if train:
            xi = x.detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(xi)
            y.backward(torch.ones_like(y))
            module.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                module(x)
    return run


def torch_layer(shape, batch, dtype, train):
    import torch
    from torch import nn
    h, cin, cout = shape
    m = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()).to(
        memory_format=torch.channels_last)
    x = torch.randn(batch, cin, h, h).to(memory_format=torch.channels_last)
    return torch_module(m, x, dtype, train)


def torch_head(fc, batch, dtype, train):
    import torch
    from torch import nn
    m = nn.Sequential(nn.Linear(fc, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                      nn.Linear(4096, 1000))
    return torch_module(m, torch.randn(batch, fc), dtype, train)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="VGG-11, width 1/16, batch 2, 1 repeat")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.arch, a.width, a.batch, a.repeats = "vgg11", 1 / 16, 2, 1
    sys.path.insert(0, ROOT)
    import jax.numpy as jnp
    import torch

    from vgg_jax import conv
    train = a.mode == "train"
    convs, fc = layers(a.arch, a.image_size, a.width)
    rows = []
    for label, shape, n in convs + [("fc6-fc8", None, 1)]:
        if shape is None:
            cases = {"jax f32": lambda: jax_head(fc, a.batch, jnp.float32, train),
                     "jax bf16 auto": lambda: jax_head(fc, a.batch, jnp.bfloat16, train),
                     "torch f32": lambda: torch_head(fc, a.batch, "float32", train),
                     "torch autocast": lambda: torch_head(fc, a.batch, "bfloat16", train)}
            plan = "dot"
        else:
            cases = {"jax f32": lambda: jax_layer(shape, a.batch, jnp.float32, "auto", train),
                     "jax bf16 auto": lambda: jax_layer(shape, a.batch, jnp.bfloat16, "auto",
                                                        train),
                     "jax bf16 xla": lambda: jax_layer(shape, a.batch, jnp.bfloat16, "xla", train),
                     "torch f32": lambda: torch_layer(shape, a.batch, "float32", train),
                     "torch autocast": lambda: torch_layer(shape, a.batch, "bfloat16", train)}
            h, cin, cout = shape
            plan = conv.resolve_conv_impl("auto", "cpu", train=train, hw=(h, h), channels=cin,
                                          kernel=3, dtype=jnp.bfloat16, batch=a.batch,
                                          out_channels=cout)
        timings = {name: timed(make(), a.repeats) for name, make in cases.items()}
        ms = {name: best for name, (_, best) in timings.items()}
        first_s = {name: first for name, (first, _) in timings.items()}
        ms.setdefault("jax bf16 xla", ms["jax bf16 auto"])  # the head has no conv: one dot
        first_s.setdefault("jax bf16 xla", first_s["jax bf16 auto"])
        jax_bf16 = min(ms["jax bf16 auto"], ms["jax bf16 xla"])
        rows.append(dict(layer=label, times=n, bf16_auto_plan=plan, ms=ms, first_s=first_s,
                         ratio=ms["torch autocast"] / jax_bf16))
    names = ("jax f32", "jax bf16 auto", "jax bf16 xla", "torch f32", "torch autocast")
    total = {k: sum(r["ms"][k] * r["times"] for r in rows) for k in names}
    best_bf16 = sum(min(r["ms"]["jax bf16 auto"], r["ms"]["jax bf16 xla"]) * r["times"]
                    for r in rows)
    first_total = {k: sum(r["first_s"][k] for r in rows) for k in names}  # each layer once
    result = dict(arch=a.arch, mode=a.mode, image_size=a.image_size, batch=a.batch,
                  width=a.width, torch=torch.__version__, threads=torch.get_num_threads(),
                  rows=rows, total_ms=total, total_ratio=total["torch autocast"] / best_bf16,
                  total_bf16_ms=best_bf16, total_first_s=first_total)
    if a.json:
        print(json.dumps(result))
        return
    print(f"{a.arch} {a.mode} {a.image_size}x{a.image_size} batch {a.batch} width {a.width}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); ms, best of {a.repeats}")
    firsts = ("jax f32", "jax bf16 auto", "torch f32", "torch autocast")
    print(f"{'layer':<22} {'x':>2} {'bf16 auto':>10} " + " ".join(f"{k:>14}" for k in names)
          + f" {'autocast/jax bf16':>18}  first call s: " + " / ".join(firsts))
    for r in rows:
        print(f"{r['layer']:<22} {r['times']:>2} {r['bf16_auto_plan']:>10} "
              + " ".join(f"{r['ms'][k]:14.1f}" for k in names)
              + f" {r['ratio']:17.2f}x  " + " / ".join(f"{r['first_s'][k]:.2f}" for k in firsts))
    print(f"{'sum x times':<22} {'':>2} {'':>10} " + " ".join(f"{total[k]:14.1f}" for k in names)
          + f" {result['total_ratio']:17.2f}x  "
          + " / ".join(f"{first_total[k]:.2f}" for k in firsts) + " (each layer once)")


if __name__ == "__main__":
    main()
