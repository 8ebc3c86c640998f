"""How large a chunk of the batch a Winograd conv should run over, which algorithm
conv1_1 should train with, and which Winograd tile each layer should take, on this CPU:
the measurements behind `winograd.CHUNK_BYTES`, the few-channel rule of
`conv.resolve_conv_impl` and its F(4x4) rule (`conv.WINOGRAD4_MIN_CHANNELS`, `_SIDES`).

    python bench/winograd_parts.py [--budgets 0.25,1,8] [--rounds 3] [--json] [--smoke]
                                   [--tables parts,first,tiles]

Table 1, per layer (VGG-16 at 32x32 b128 and 224x224 b16, d2l's VGG-11/4 at 64x64 b128,
and two wide F(4x4) layers): forward + both gradients of `conv.conv2d` + ReLU under
`jax.jit(jax.grad)`, ms (best of --rounds, rounds interleaved), with the chunk budget
set to each of --budgets MB of input map (`winograd.CHUNK_BYTES`), and in brackets the
number of chunks that budget gives and the first call's seconds (tracing, XLA's compile
and one run). The column marked * is the library's budget.
Table 2, conv1_1's few input channels: the kernel gradient alone (all a first layer
needs) and with the input gradient, per algorithm, ms (first call's seconds).
Table 3, the tile: forward + both gradients + ReLU of every distinct Winograd layer of
VGG-16 at 32x32 b128 and 224 b16 and of d2l's VGG-11/4 at 64x64 b128, with F(2x2) and
with F(4x4), ms (first call's seconds), and what 'auto' picks for the layer.
Table 4, small layers (the narrow nets of quick experiments and of the test suite, beside
VGG-16's and LPIPS's): training, forward + both gradients under the training step's
compiler options, im2col / XLA's conv / F(2x2); inference, the forward under the eval
options (XLA's conv through YNNPACK / F(2x2)); ms (first call's seconds), with the
layer's work (batch x map x Cin x Cout, millions) and what 'auto' picks for each: the
measurements behind `conv.TRAIN_WINOGRAD_MIN_WORK` and `conv.EVAL_WINOGRAD_MIN_WORK`.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import conv, winograd

# (name, side, Cin, Cout, batch, tile)
LAYERS = [("vgg16-32 conv1_2", 32, 64, 64, 128, 2), ("vgg16-32 conv2_1", 16, 64, 128, 128, 2),
          ("vgg16-32 conv2_2", 16, 128, 128, 128, 2), ("vgg16-224 conv1_2", 224, 64, 64, 16, 2),
          ("vgg16-224 conv2_1", 112, 64, 128, 16, 2), ("vgg16-224 conv2_2", 112, 128, 128, 16, 2),
          ("d2l-64 conv2_1", 32, 16, 32, 128, 2), ("d2l-64 conv3_1", 16, 32, 64, 128, 2),
          ("d2l-64 conv3_2", 16, 64, 64, 128, 2), ("d2l-64 conv5_1", 8, 128, 128, 128, 2),
          ("vgg16-32 conv3_2 (wide)", 8, 256, 256, 128, 4),
          ("vgg16-224 conv4_2 (wide)", 28, 512, 512, 16, 4)]
FIRST = [("vgg16-32 conv1_1", 32, 3, 64, 128), ("vgg16-224 conv1_1", 224, 3, 64, 16),
         ("d2l-64 conv1_1", 64, 1, 16, 128)]
SMOKE_LAYERS = [("tiny narrow", 8, 8, 8, 4, 2), ("tiny wide", 8, 256, 256, 2, 4)]
SMOKE_FIRST = [("tiny conv1_1", 8, 3, 8, 4)]
# (name, side, Cin, Cout, batch)
TILES = [("vgg16-32 conv1_2", 32, 64, 64, 128), ("vgg16-32 conv2_1", 16, 64, 128, 128),
         ("vgg16-32 conv2_2", 16, 128, 128, 128), ("vgg16-32 conv3_1", 8, 128, 256, 128),
         ("vgg16-32 conv3_2", 8, 256, 256, 128), ("vgg16-32 conv4_1", 4, 256, 512, 128),
         ("vgg16-32 conv4_2", 4, 512, 512, 128), ("vgg16-224 conv1_2", 224, 64, 64, 16),
         ("vgg16-224 conv2_1", 112, 64, 128, 16), ("vgg16-224 conv2_2", 112, 128, 128, 16),
         ("vgg16-224 conv3_1", 56, 128, 256, 16), ("vgg16-224 conv3_2", 56, 256, 256, 16),
         ("vgg16-224 conv4_1", 28, 256, 512, 16), ("vgg16-224 conv4_2", 28, 512, 512, 16),
         ("vgg16-224 conv5_1", 14, 512, 512, 16), ("d2l-64 conv2_1", 32, 16, 32, 128),
         ("d2l-64 conv3_1", 16, 32, 64, 128), ("d2l-64 conv3_2", 16, 64, 64, 128),
         ("d2l-64 conv4_1", 8, 64, 128, 128), ("d2l-64 conv4_2", 8, 128, 128, 128),
         ("d2l-64 conv5_1", 4, 128, 128, 128)]
SMOKE_TILES = [("tiny", 8, 64, 64, 16)]  # 4.2M of work: 'auto' trains it with F(2x2)
# (name, side, Cin, Cout, batch): VGG-11 at 1/16 and 1/4 width on 32x32 digits (the test
# suite's nets and the README's main job; training batch 64, evaluation 128), layers of
# VGG-16 at 32x32 b128 and of LPIPS at 64x64 b16, then wide layers at small batches
SMALL = [("vgg11/16 conv4", 8, 16, 16, 64), ("vgg11/16 conv5", 4, 16, 32, 64),
         ("vgg11/16 conv6", 4, 32, 32, 64), ("vgg11/4 conv2", 16, 16, 32, 64),
         ("vgg11/4 conv3", 8, 32, 64, 64), ("vgg11/4 conv4", 8, 64, 64, 64),
         ("vgg11/4 conv5", 4, 64, 128, 64), ("vgg11/4 conv6", 4, 128, 128, 64),
         ("narrow b16", 8, 32, 32, 16), ("narrow b32", 8, 32, 64, 32),
         ("vgg16-32 conv4_2 b16", 4, 512, 512, 16),
         ("vgg11/4 conv4 eval", 8, 64, 64, 128), ("vgg11/4 conv5 eval", 4, 64, 128, 128),
         ("vgg11/4 conv6 eval", 4, 128, 128, 128), ("vgg16-32 conv4_2", 4, 512, 512, 128),
         ("vgg16-32 conv3_1", 8, 128, 256, 128), ("vgg16-32 conv2_1", 16, 64, 128, 128),
         ("lpips-64 conv1_2", 64, 64, 64, 16), ("lpips-64 conv3_2", 16, 256, 256, 16),
         ("lpips-64 conv4_2", 8, 512, 512, 16), ("4x4 512 b32", 4, 512, 512, 32),
         ("4x4 512 b64", 4, 512, 512, 64), ("8x8 256 b8", 8, 256, 256, 8),
         ("8x8 256 b16", 8, 256, 256, 16), ("14x14 512 b4", 14, 512, 512, 4),
         ("8x8 512 b16", 8, 512, 512, 16), ("16x16 64->128 b4", 16, 64, 128, 4),
         ("8x8 128 b16", 8, 128, 128, 16)]
SMOKE_SMALL = [("tiny", 4, 16, 16, 2)]
TABLES = ("parts", "first", "tiles", "small")


def arrays(side, cin, cout, batch):
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(batch, side, side, cin)), jnp.float32)
    k = jnp.asarray(r.normal(size=(3, 3, cin, cout)) * 0.05, jnp.float32)
    return x, k


def grad_fn(impl, argnums, compiler_options=None):
    loss = lambda x, k: jnp.sum(jax.nn.relu(conv.conv2d(x, k, impl)) ** 2)
    return jax.jit(jax.grad(loss, argnums=argnums), compiler_options=compiler_options)


def best_ms(fns, args, rounds):
    """{key: best ms} over `rounds` interleaved calls of each compiled fn."""
    times = {key: [] for key in fns}
    for _ in range(rounds):
        for key, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[key].append(time.perf_counter() - t)
    return {key: 1e3 * min(v) for key, v in times.items()}


def part_table(layers, budgets, rounds):
    saved = winograd.CHUNK_BYTES
    rows = []
    for name, side, cin, cout, batch, tile in layers:
        x, k = arrays(side, cin, cout, batch)
        impl = {2: "winograd", 4: "winograd4"}[tile]
        fns, split, first = {}, {}, {}
        for b in budgets:
            winograd.CHUNK_BYTES = int(b * 2**20)
            split[b] = winograd.batch_chunks(x.shape, max(cin, cout))
            fns[b] = grad_fn(impl, (0, 1))
            first[b] = first_call_s(fns[b], (x, k))  # compiled with this budget
            winograd.CHUNK_BYTES = saved
        ms = best_ms(fns, (x, k), rounds)
        rows.append(dict(layer=name, shape=f"{side}x{side} {cin}->{cout} b{batch} F({tile})",
                         library_mb=saved / 2**20,
                         ms={str(b): round(ms[b], 1) for b in budgets},
                         chunks={str(b): split[b] for b in budgets},
                         first_s={str(b): round(first[b], 2) for b in budgets}))
    return rows


def first_call_s(f, args) -> float:
    """Seconds of f's first call: tracing, XLA's compile and one run."""
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def layer_row(name, side, cin, cout, batch, fns, rounds):
    """One row of tables 2-4: each of `fns` (name -> jitted function of one layer's
    (x, kernel)) on that layer's arrays, ms (best of `rounds`) and first call's seconds,
    with what 'auto' trains the layer with (at this batch)."""
    x, k = arrays(side, cin, cout, batch)
    first = {key: first_call_s(f, (x, k)) for key, f in fns.items()}
    ms = best_ms(fns, (x, k), rounds)
    plan = conv.resolve_conv_impl("auto", "cpu", train=True, hw=(side, side), channels=cin,
                                  batch=batch, out_channels=cout)
    return dict(layer=name, shape=f"{side}x{side} {cin}->{cout} b{batch}", auto=plan,
                ms={key: round(v, 2) for key, v in ms.items()},
                first_s={key: round(v, 2) for key, v in first.items()})


def first_table(layers, rounds):
    def fns():
        return {f"{impl} {grads}": grad_fn(impl, (1,) if grads == "dk" else (0, 1))
                for grads in ("dk", "dx+dk") for impl in ("im2col", "winograd", "xla")}
    return [layer_row(*layer, fns(), rounds) for layer in layers]


def tile_table(layers, rounds):
    def fns():
        return {impl: grad_fn(impl, (0, 1)) for impl in ("winograd", "winograd4")}
    return [layer_row(*layer, fns(), rounds) for layer in layers]


def small_table(layers, rounds):
    """Table 4: per layer, training and inference per algorithm, each jitted with the
    options the library's own jits use (conv.train_compiler_options / eval_...)."""
    def fns():
        train = {f"train {impl}": grad_fn(impl, (0, 1), conv.train_compiler_options())
                 for impl in ("im2col", "xla", "winograd")}
        infer = {f"eval {impl}": jax.jit(lambda x, k, impl=impl: conv.conv2d(x, k, impl),
                                         compiler_options=conv.eval_compiler_options())
                 for impl in ("xla", "winograd")}
        return {**train, **infer}

    rows = []
    for name, side, cin, cout, batch in layers:
        row = layer_row(name, side, cin, cout, batch, fns(), rounds)
        row.update(work_m=batch * side * side * cin * cout / 1e6, auto_train=row.pop("auto"),
                   auto_eval=conv.resolve_conv_impl("auto", "cpu", hw=(side, side),
                                                    channels=cin, batch=batch,
                                                    out_channels=cout))
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", help="MB of input map per chunk (default 0.25,1,8; with "
                    "--smoke 0.001,8: one image a chunk, then the whole batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny layers, one round (CI)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"which of {','.join(TABLES)}")
    a = ap.parse_args(argv)
    tables = a.tables.split(",")
    if set(tables) - set(TABLES):
        ap.error(f"--tables: {', '.join(sorted(set(tables) - set(TABLES)))} is none of "
                 f"{', '.join(TABLES)}")
    budgets = [float(b) for b in (a.budgets or ("0.001,8" if a.smoke else "0.25,1,8")).split(",")]
    rounds = 1 if a.smoke else a.rounds
    out = {}
    if "parts" in tables:
        out["parts"] = part_table(SMOKE_LAYERS if a.smoke else LAYERS, budgets, rounds)
    if "first" in tables:
        out["first"] = first_table(SMOKE_FIRST if a.smoke else FIRST, rounds)
    if "tiles" in tables:
        out["tiles"] = tile_table(SMOKE_TILES if a.smoke else TILES, rounds)
    if "small" in tables:
        out["small"] = small_table(SMOKE_SMALL if a.smoke else SMALL, rounds)
    if a.json:
        print(json.dumps(out))
        return
    if "parts" in out:
        print_parts(out["parts"], budgets)
    if "first" in out:
        print_first(out["first"])
    if "tiles" in out:
        print_tiles(out["tiles"])
    if "small" in out:
        print_small(out["small"])


def print_parts(parts_rows, budgets):
    head = " | ".join(f"{b:g} MB" for b in budgets)
    print(f"| layer | shape | {head} |\n|---|---|" + "---|" * len(budgets))
    for r in parts_rows:
        cells = [f"{r['ms'][str(b)]:.1f} ({r['chunks'][str(b)]}; {r['first_s'][str(b)]:.1f} s)"
                 + ("*" if abs(b - r["library_mb"]) < 1e-9 else "") for b in budgets]
        print(f"| {r['layer']} | {r['shape']} | " + " | ".join(cells) + " |")


def print_first(first_rows):
    keys = list(first_rows[0]["ms"])
    print("\n| layer | shape | auto | " + " | ".join(keys) + " |\n|---|---|---|"
          + "---|" * len(keys))
    for r in first_rows:
        print(f"| {r['layer']} | {r['shape']} | {r['auto']} | "
              + " | ".join(f"{r['ms'][k]:.1f} ({r['first_s'][k]:.1f} s)" for k in keys) + " |")


def print_tiles(tile_rows):
    print("\n| layer | shape | auto | F(2x2) ms (first s) | F(4x4) ms (first s) | "
          "F(4x4) / F(2x2) |\n|---|---|---|---|---|---|")
    for r in tile_rows:
        ms, first = r["ms"], r["first_s"]
        print(f"| {r['layer']} | {r['shape']} | {r['auto']} | {ms['winograd']:.1f} "
              f"({first['winograd']:.1f}) | {ms['winograd4']:.1f} ({first['winograd4']:.1f}) "
              f"| {ms['winograd4'] / ms['winograd']:.2f}x |")


def print_small(rows):
    keys = list(rows[0]["ms"])
    print("\n| layer | shape | work (M) | auto train / eval | " + " | ".join(keys)
          + " |\n|---|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['layer']} | {r['shape']} | {r['work_m']:.1f} | {r['auto_train']} / "
              f"{r['auto_eval']} | "
              + " | ".join(f"{r['ms'][k]:.2f} ({r['first_s'][k]:.2f})" for k in keys) + " |")


if __name__ == "__main__":
    main()
