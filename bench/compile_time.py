"""Where the first training step's compile time goes (issue 30): the whole step per conv
algorithm, and one layer at a time per layer kind.

    python bench/compile_time.py [--arch vgg16] [--image-size 32] [--batch 128]
                                 [--impls auto,xla,im2col,winograd] [--no-layers]

Whole step: the step users write (`jax.value_and_grad` of model.apply's cross-entropy +
optax SGD with momentum and weight decay, `jax.jit(..., donate_argnums=(0, 1))`), built
with `create_model(..., conv_impl=IMPL)` for each IMPL; the table splits the first call
into tracing + lowering to StableHLO (Python, JAX) and XLA's compile, each in wall and in
CPU seconds of this process (XLA compiles on several threads), with the persistent
compile cache off so that every figure is a real compile.

Per layer: each distinct layer of the network at its place in the step (the conv at its
input shape with the implementation 'auto' picks there, and with XLA's own conv; the
pools, fc6-fc8 with dropout), as a jitted forward + backward (`jax.vjp`) of that layer
alone; the last column is the layer's compile seconds times how often it occurs.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(f):
    w, c = time.perf_counter(), time.process_time()
    out = f()
    return out, time.perf_counter() - w, time.process_time() - c


def step_compile(model, x, y, rng):
    """(trace+lower wall, cpu, compile wall, cpu) of the user's donated training step."""
    import jax
    import optax

    from vgg_jax import models, train
    variables = models.init_variables(model, rng, x.shape[1])
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    params, opt_state = variables["params"], tx.init(variables["params"])

    def loss_fn(params, images, labels, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        return train.cross_entropy(logits, labels).mean()

    def step(params, opt_state, images, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    lowered, lw, lc = timed(lambda: jitted.trace(params, opt_state, x, y, rng).lower())
    _, cw, cc = timed(lowered.compile)
    return lw, lc, cw, cc


def layer_cases(arch, size, batch, width):
    """[(label, conv_impl asked or "", times in the net, fn, argument shapes)] for each
    distinct layer of the step."""
    import jax
    import jax.numpy as jnp

    from vgg_jax import conv, models, ops
    letter, _ = models.resolve_arch(arch)
    cases = {}
    h, c = size, 3
    for layer in models.layer_table(letter):
        if layer.kind == "conv":
            out = models.scaled(layer.channels, width)
            for impl in ("auto", "xla"):
                chosen = conv.resolve_conv_impl(impl, train=True, hw=(h, h), channels=c,
                                                kernel=layer.kernel, batch=batch,
                                                out_channels=out)
                key = (f"conv{layer.kernel} {h}x{h} {c}->{out} {chosen}", impl)
                if key not in cases:
                    kernel = (layer.kernel, layer.kernel, c, out)
                    cases[key] = [0, functools.partial(conv.conv_layer, impl=chosen, train=True),
                                  [(batch, h, h, c), kernel]]
                cases[key][0] += 1
            c = out
        elif layer.kind == "pool":
            key = (f"max_pool {h}x{h}x{c}", "")
            cases.setdefault(key, [0, lambda x: ops.max_pool(x, False), [(batch, h, h, c)]])
            cases[key][0] += 1
            h //= 2
    fc = models.scaled(512, width) * h * h

    def head(x, w6, w7, w8):
        key = jax.random.PRNGKey(0)
        for w in (w6, w7):
            x = jax.nn.relu(x @ w)
            keep = jax.random.bernoulli(key, 0.5, x.shape)
            x = jnp.where(keep, x / 0.5, 0)
        return x @ w8
    cases[(f"fc6-fc8 + dropout ({fc}->4096->4096->1000)", "")] = [
        1, head, [(batch, fc), (fc, 4096), (4096, 4096), (4096, 1000)]]
    return [(label, impl, n, f, shapes) for (label, impl), (n, f, shapes) in cases.items()]


def layer_compile(f, shapes):
    import jax
    import jax.numpy as jnp
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

    def fwd_bwd(*xs):
        y, vjp = jax.vjp(f, *xs)
        return vjp(jnp.ones_like(y))

    _, w, c = timed(lambda: jax.jit(fwd_bwd).trace(*args).lower().compile())
    return w, c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--impls", default="auto,xla,im2col,winograd")
    ap.add_argument("--no-layers", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    import vgg_jax
    from jax.experimental.compilation_cache import compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    # JAX decides once per process whether the cache is used: when something in this
    # process already compiled with it on, the setting alone would be ignored
    compilation_cache.reset_cache()
    rng = jax.random.PRNGKey(0)
    x = np.random.default_rng(0).normal(size=(a.batch, a.image_size, a.image_size, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 1000, a.batch).astype(np.int32)
    print(f"{a.arch} {a.image_size}x{a.image_size} batch {a.batch} width {a.width}, "
          f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores")
    print(f"\n{'conv_impl':<10} {'trace+lower s':>14} {'(cpu)':>7} {'XLA compile s':>14} "
          f"{'(cpu)':>7} {'total wall s':>13}")
    for impl in a.impls.split(","):
        model = vgg_jax.create_model(a.arch, num_classes=1000, width=a.width, conv_impl=impl,
                                     classifier_pool=1)
        lw, lc, cw, cc = step_compile(model, x, y, rng)
        print(f"{impl:<10} {lw:>14.1f} {lc:>7.1f} {cw:>14.1f} {cc:>7.1f} {lw + cw:>13.1f}",
              flush=True)
    if a.no_layers:
        return
    print(f"\n{'layer (forward + backward alone)':<44} {'asked':<5} {'n':>2} "
          f"{'compile s':>9} {'(cpu)':>7} {'x n (cpu)':>9}")
    total = {}
    for label, impl, n, f, shapes in layer_cases(a.arch, a.image_size, a.batch, a.width):
        w, c = layer_compile(f, shapes)
        for key in ([impl] if impl else ["auto", "xla"]):
            total[key] = total.get(key, 0.0) + c * n
        print(f"{label:<44} {impl:<5} {n:>2} {w:>9.2f} {c:>7.2f} {c * n:>9.2f}", flush=True)
    print(f"sum of CPU seconds x n, all layers: with conv 'auto' {total['auto']:.1f}, "
          f"with conv 'xla' {total['xla']:.1f}")


if __name__ == "__main__":
    main()
