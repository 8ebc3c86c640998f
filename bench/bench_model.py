"""vgg_jax vs PyTorch, same architecture, batch, input size and dtype, on this machine.

    python bench/bench_model.py --arch vgg16 --mode train --image-size 32 --batch 128
    python bench/bench_model.py --arch vgg16 --mode infer --image-size 224 --batch 8
    python bench/bench_model.py --smoke          # tiny sizes, seconds (the test suite runs it)

Each (framework, mode) runs in its own subprocess, one after the other, so peak memory
(max RSS) is each one's own. PyTorch's baseline is its best ordinary CPU setting:
channels_last, all cores, torch.no_grad + eval for inference, SGD(momentum) training.
vgg_jax: the jitted train step of vgg_jax.train (donated state) / a jitted eval forward
(models.jit_eval: on CPU, YNNPACK convs). Each side times --repeats loops of --steps after
a warm-up (compile) step; the best loop counts, which damps noise from other processes.
Prints a table, or one JSON object with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_NAMES = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(step, a, t0, sync=lambda out: None) -> tuple[float, float]:
    """(seconds from t0 to the end of the first, compiling, step; the best of a.repeats
    timed loops of a.steps steps). `sync` waits for a step's output (JAX is async)."""
    sync(step())
    compile_s = time.perf_counter() - t0
    dt = float("inf")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            out = step()
        sync(out)
        dt = min(dt, time.perf_counter() - t0)
    return compile_s, dt


def run_jax(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from vgg_jax import models, optim, train
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import load_config
    c = load_config()
    c.model.update(arch=a.arch, width=a.width, fc_widths=(a.fc, a.fc), classifier_pool=7,
                   conv_impl=a.conv_impl)
    c.train.dtype = a.dtype
    c.optim.update(schedule="constant", warmup_epochs=0)
    model = train.build_model(c, 1000)
    x = np.random.default_rng(0).normal(size=(a.batch, a.image_size, a.image_size, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 1000, a.batch).astype(np.int32)
    t0 = time.perf_counter()
    if a.mode == "train":
        tx = optim.make_optimizer(c.optim, models.abstract_variables(model, a.image_size)["params"], 0.01)
        par = train.Parallel(model, tx)
        state = par.replicate(train.create_state(model, tx, optim.Plateau(2, 3),
                                                 jax.random.PRNGKey(0), a.image_size))
        batch = par.global_batch({"image": x, "label": y})

        def step():
            nonlocal state
            state, metrics = par.train_step(state, batch)
            return metrics
    else:
        variables = models.init_variables(model, jax.random.key(0), a.image_size)
        f = models.jit_eval(lambda v, x: model.apply(v, x, train=False))
        xj = jnp.asarray(x)

        def step():
            return f(variables, xj)
    compile_s, dt = measure(step, a, t0, jax.block_until_ready)
    plan = models.conv_plan(a.arch, a.image_size, width=a.width, impl=a.conv_impl,
                            train=a.mode == "train")
    return dict(img_per_s=a.batch * a.steps / dt, compile_s=compile_s, peak_mb=peak_mb(),
                conv_impl=models.describe_plan(plan)
                + (" (YNNPACK options)" if a.mode == "infer" and models.eval_compiler_options() else ""))


def run_torch(a) -> dict:
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torchvision_vgg import VGG
    from vgg_jax import models
    letter, bn = models.resolve_arch(a.arch)
    torch.set_num_threads(os.cpu_count())
    net = VGG(TORCH_NAMES[letter], bn, width=a.width, fc=a.fc).to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    x = torch.randn(a.batch, 3, a.image_size, a.image_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (a.batch,))
    t0 = time.perf_counter()
    if a.mode == "train":
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
    else:
        net.eval()

        def step():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                net(x)
    compile_s, dt = measure(step, a, t0)
    return dict(img_per_s=a.batch * a.steps / dt, compile_s=compile_s, peak_mb=peak_mb(),
                torch=torch.__version__)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--mode", default="both", choices=["train", "infer", "both"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed loops of --steps; the best counts")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--fc", type=int, default=4096)
    p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col", "winograd"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for the tests")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.arch, a.image_size, a.batch, a.steps, a.width, a.fc = "vgg11", 32, 4, 2, 1 / 16, 32
        a.repeats = 1
    return a


def main(argv=None):
    a = parse(argv)
    if a.worker:
        print(json.dumps(run_jax(a) if a.worker == "jax" else run_torch(a)))
        return
    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    rows = []
    for mode in modes:
        row = dict(mode=mode, arch=a.arch, batch=a.batch, image_size=a.image_size, dtype=a.dtype,
                   width=a.width)
        for fw in ("jax", "torch"):
            args = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--mode", mode,
                    "--arch", a.arch, "--image-size", str(a.image_size), "--batch", str(a.batch),
                    "--dtype", a.dtype, "--steps", str(a.steps), "--repeats", str(a.repeats),
                    "--width", str(a.width),
                    "--fc", str(a.fc), "--conv-impl", a.conv_impl]
            out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{fw} {mode} failed:\n{out.stderr[-3000:]}")
            row[fw] = json.loads(out.stdout.strip().splitlines()[-1])
        row["ratio"] = row["jax"]["img_per_s"] / row["torch"]["img_per_s"]
        rows.append(row)
    if a.json:
        print(json.dumps(dict(rows=rows, cpus=os.cpu_count())))
        return
    print(f"{'mode':<6} {'arch':<8} {'batch':>5} {'size':>5} {'dtype':<9} {'vgg_jax img/s':>14} "
          f"{'torch img/s':>12} {'ratio':>6} {'jax compile s':>13} {'jax MB':>8} {'torch MB':>8}")
    for r in rows:
        print(f"{r['mode']:<6} {r['arch']:<8} {r['batch']:>5} {r['image_size']:>5} {r['dtype']:<9} "
              f"{r['jax']['img_per_s']:>14.2f} {r['torch']['img_per_s']:>12.2f} {r['ratio']:>6.2f} "
              f"{r['jax']['compile_s']:>13.1f} {r['jax']['peak_mb']:>8.0f} {r['torch']['peak_mb']:>8.0f}")
    for r in rows:
        print(f"{r['mode']} conv_impl={a.conv_impl}: {r['jax']['conv_impl']}")
    print(f"torch {rows[0]['torch']['torch']}, channels_last, {os.cpu_count()} threads")


if __name__ == "__main__":
    main()
