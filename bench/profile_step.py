"""Where one training step's time goes, by XLA op (issue 30): the step of bench_model.py's
`jax grad+optax` row (`bench_model.grad_optax_step`: `jax.value_and_grad` + optax SGD
with momentum and weight decay, donated state; VGG-16 unless --arch), traced with
`jax.profiler` and summed by the names of XLA's kernels (fusions, dots, convs,
reduce-windows).

    python bench/profile_step.py [--image-size 224] [--batch 16] [--steps 2] [--top 25]
    python bench/profile_step.py --smoke       # VGG-11, width 1/16, batch 2, 32x32: seconds

Prints the wall time of the profiled steps, then the ops by total time per step: the
name XLA gave the kernel, its kind (the text before the first '.' or digit, e.g.
`loop_convolution_fusion`, `dot`, `reduce-window`), calls and milliseconds per step, and a
second table summed by kind. Each kernel's time is what its trace event records (XLA:CPU
runs kernels on its thread pool, so concurrent events can add up to more than the wall);
loops and calls are left out, their bodies' kernels are counted. The profiler slows the
step (~40% at 224 b16: tens of thousands of events): the shares are what it shows.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kind(name: str) -> str:
    return re.split(r"[.\d]", name, maxsplit=1)[0] or name


# ops whose events enclose other kernels' (a while loop's body runs inside its event):
# counted, they would count their kernels twice
CONTAINERS = ("while", "call", "conditional")


def summarize(trace_file: str, steps: int, skip=("$", "Thunk", "ThunkExecutor")):
    """{op name: (calls, total ms)} / steps, from a perfetto trace's complete events that
    come from XLA's kernels (events named by Python or the runtime are left out)."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        if (not name or name.startswith(skip) or " " in name or "::" in name
                or name.startswith(("jit_", "Pjit")) or kind(name) in CONTAINERS):
            continue
        ops[name][0] += 1
        ops[name][1] += e["dur"] / 1e3
    return {k: (c / steps, ms / steps) for k, (c, ms) in ops.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--smoke", action="store_true",
                    help="VGG-11, width 1/16, batch 2, 32x32, 1 step")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.arch, a.width, a.batch, a.image_size, a.steps = "vgg11", 1 / 16, 2, 32, 1
    sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import vgg_jax
    from bench_model import classifier_pool, grad_optax_step
    from vgg_jax import models
    a.torchvision_layout = False
    model = vgg_jax.create_model(a.arch, num_classes=1000, width=a.width, fc_widths=(4096, 4096),
                                 dtype=jnp.dtype(a.dtype), classifier_pool=classifier_pool(a))
    variables = models.init_variables(model, jax.random.key(0), a.image_size)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(a.batch, a.image_size, a.image_size, 3)), jnp.float32)
    y = jnp.asarray(r.integers(0, 1000, a.batch), jnp.int32)

    step = jax.jit(grad_optax_step(model, tx), donate_argnums=(0, 1, 2))
    state = [params, stats, tx.init(params)]
    key = jax.random.key(1)
    *state, loss = step(*state, x, y, key)  # compile
    jax.block_until_ready(loss)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(a.steps):
                *state, loss = step(*state, x, y, key)
            jax.block_until_ready(loss)
        wall = (time.perf_counter() - t0) / a.steps
        [trace] = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        ops = summarize(trace, a.steps)
    by_kind = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (calls, ms) in ops.items():
        by_kind[kind(name)][0] += calls
        by_kind[kind(name)][1] += ms
    top = sorted(ops.items(), key=lambda kv: -kv[1][1])
    if a.json:
        print(json.dumps(dict(wall_ms=1e3 * wall, ops={k: v for k, v in top},
                              kinds={k: v for k, v in by_kind.items()})))
        return
    total = sum(ms for _, ms in ops.values())
    print(f"{a.arch} train {a.image_size}x{a.image_size} batch {a.batch} {a.dtype} width "
          f"{a.width}: {1e3 * wall:.0f} ms per step (wall, under the profiler); kernels' "
          f"events sum to {total:.0f} ms per step")
    print(f"\n{'op':<48} {'calls':>6} {'ms/step':>9} {'share':>6}")
    for name, (calls, ms) in top[:a.top]:
        print(f"{name[:48]:<48} {calls:6.0f} {ms:9.1f} {ms / total:6.1%}")
    print(f"\n{'kind':<48} {'calls':>6} {'ms/step':>9} {'share':>6}")
    for k, (calls, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"{k[:48]:<48} {calls:6.0f} {ms:9.1f} {ms / total:6.1%}")


if __name__ == "__main__":
    main()
