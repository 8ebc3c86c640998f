"""A/B in one process: a VGG-16 training step (32x32, fc 512, batch 64, SGD momentum,
donated state) with Winograd as the bilinear primitive (vgg_jax.conv today) and as the
custom VJP it replaced on 2026-11-29 (vgg_jax/conv.py of the commit before, read from
git), the two interleaved so that both see the same machine load.

    python bench/ab_winograd_primitive.py [--old-commit 1958669] [--batch 64]
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-commit", default="1958669")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import vgg_jax
    from vgg_jax import conv, models
    source = subprocess.run(["git", "show", f"{a.old_commit}:vgg_jax/conv.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_conv", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    model = vgg_jax.create_model("vgg16", num_classes=10, fc_widths=(512, 512), classifier_pool=1)
    v = models.init_variables(model, jax.random.key(0), 32)
    tx = optax.sgd(0.01, momentum=0.9)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(a.batch, 32, 32, 3)), jnp.float32)
    y = jnp.arange(a.batch) % 10

    def step(p, o):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(
            {"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}), y).mean()
        value, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, value

    runs = {}
    for name, fn in (("primitive", conv.winograd_conv3x3), ("custom_vjp", old.winograd_conv3x3)):
        conv.winograd_conv3x3 = fn  # conv2d looks it up at trace time
        f = jax.jit(step, donate_argnums=(0, 1))
        p, o = jax.tree.map(jnp.copy, v["params"]), tx.init(v["params"])
        t0 = time.perf_counter()
        p, o, loss = f(p, o)
        loss.block_until_ready()
        print(f"{name}: compile + first step {time.perf_counter() - t0:.1f} s, loss "
              f"{float(loss):.6f}", flush=True)
        runs[name] = [f, p, o, float("inf")]
    for _ in range(3):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(3):
                r[1], r[2], loss = r[0](r[1], r[2])
            loss.block_until_ready()
            r[3] = min(r[3], (time.perf_counter() - t0) / 3)
    for name, r in runs.items():
        print(f"{name:<11} {a.batch / r[3]:7.1f} img/s")
    print(f"ratio primitive / custom_vjp: {runs['custom_vjp'][3] / runs['primitive'][3]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
