"""vgg_jax vs PyTorch on this machine: the same network, function, batch, size and dtype.

    python bench/bench_model.py --mode train --image-size 32 --batch 128    # VGG-16
    python bench/bench_model.py --mode infer --image-size 224 --batch 8
    python bench/bench_model.py --mode train --image-size 224 --batch 16 --steps 2
    python bench/bench_model.py --dtype bfloat16 ...     # vgg_jax bf16 compute vs torch autocast
    python bench/bench_model.py --smoke --json           # seconds (the test suite runs it)

Like with like, the way users run each side:
- The same function, algebra and parameters. Below 224, pool5 is smaller than
  torchvision's 7x7 adaptive pool, which would upsample it; both sides then put fc6 on
  the flattened pool5 (vgg_jax: `classifier_pool` = pool5's size, as configs/default.py;
  torch: what a PyTorch user writes for 32x32 inputs, e.g. the seeds' CIFAR-10 VGG): both
  multiply 512 x 4096 at 32x32. `--torchvision-layout` keeps torchvision's 7x7 pool and
  25088-row fc6 on both sides (vgg_jax folds the upsampling pool into fc6's kernel, torch
  runs it; the figures before 2026-11-28 were measured that way), labelled as such.
- PyTorch: eager with channels_last (its best ordinary CPU setting) and, as its own row,
  torch.compile (inductor; needs the C++ compiler, which this machine has). SGD with
  momentum and weight decay; no_grad + eval for inference; autocast for bfloat16.
- vgg_jax through its public API, after `vgg_jax.configure_cpu()` (the process-wide XLA:CPU
  options the commands set; rows ending in "(no opt-in)" run without it, as a program that
  only imports vgg_jax does): `jax.jit(lambda v, x: model.apply(v, x, train=False))`
  for inference (plus `conv.jit_eval`, the wrapper the CLIs use, as its own row); for
  training a plain `jax.value_and_grad` + optax SGD step jitted with donated state, the
  same step without donation (`jax.jit(step)`, what most research code writes first),
  and `train.py`'s own step (`train.parallel_steps`), each as its own row.
The ratios are against the faster of torch eager and torch.compile in the same run (the
strongest ordinary PyTorch), for speed and for peak memory.
Each row runs in its own subprocess, one after the other, so peak memory (max RSS) is
each one's own. Each times --repeats loops of --steps after a warm-up (compiling) step
and keeps the best loop. Prints a table, or one JSON object with --json.
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


def _choices():
    """vgg_jax/choices.py (import-free) loaded by path: importing it as vgg_jax.choices
    would run the package's import (JAX, XLA_FLAGS) in every worker, the torch rows
    included, and change their peak memory."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_vgg_jax_choices", os.path.join(ROOT, "vgg_jax", "choices.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHOICES = _choices()
NO_OPT_IN = " (no opt-in)"  # a jax row without `vgg_jax.configure_cpu()` (the process's XLA)
ROWS = {"train": ("torch eager", "torch.compile", "jax grad+optax", "jax grad+optax undonated",
                   "jax train.py step", "jax grad+optax" + NO_OPT_IN),
        "infer": ("torch eager", "torch.compile", "jax jit(model.apply)", "jax conv.jit_eval",
                  "jax jit(model.apply)" + NO_OPT_IN)}


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


def classifier_pool(a) -> int:
    """Both sides' fc6 input grid: pool5's own size below 224 (fc6 on the flattened pool5,
    as a user training at 32x32 writes it in either framework: the same function and the
    same parameters), torchvision's 7x7 at 224 or with --torchvision-layout (where
    vgg_jax folds the upsampling pool into fc6 and torch runs it)."""
    return 7 if a.torchvision_layout else min(7, a.image_size // 32)


def data(a):
    import numpy as np
    x = np.random.default_rng(0).normal(size=(a.batch, a.image_size, a.image_size, 3))
    y = np.random.default_rng(1).integers(0, 1000, a.batch)
    return x.astype(np.float32), y.astype(np.int32)


def run_jax(a, row: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import vgg_jax
    from vgg_jax import conv, models
    if row.endswith(NO_OPT_IN):  # the library as imported, XLA as the user's process has it
        row = row[:-len(NO_OPT_IN)]
    else:  # what the commands do first: the process-wide XLA:CPU options, the heap trim
        vgg_jax.configure_cpu()
    model = vgg_jax.create_model(a.arch, num_classes=1000, width=a.width, fc_widths=(a.fc, a.fc),
                                 dtype=jnp.dtype(a.dtype), conv_impl=a.conv_impl,
                                 classifier_pool=classifier_pool(a))
    x, y = data(a)
    t0 = time.perf_counter()
    if row.startswith("jax grad+optax"):
        variables = models.init_variables(model, jax.random.key(0), a.image_size)
        params, stats = variables["params"], variables.get("batch_stats", {})
        tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
        donate = () if row.endswith("undonated") else (0, 1, 2)
        train_step = jax.jit(grad_optax_step(model, tx), donate_argnums=donate)
        state = [params, stats, tx.init(params)]
        # the loop's state is the only reference, as in a user's loop that rebinds it
        # (undonated, these names would keep the initial weights alive: +553 MB at 224)
        del variables, params, stats
        xj, yj, key = jnp.asarray(x), jnp.asarray(y), jax.random.key(1)

        def step():
            *new, loss = train_step(*state, xj, yj, key)
            state[:] = new
            return loss
    elif row == "jax train.py step":
        from vgg_jax import optim, train
        tx = optim.make_optimizer(_optim_config(), models.abstract_variables(
            model, a.image_size)["params"], 0.01)
        par = train.parallel_steps(model, tx)
        state = par.replicate(train.create_state(model, tx, optim.Plateau(2, 3),
                                                 jax.random.PRNGKey(0), a.image_size))
        batch = par.global_batch({"image": x, "label": y})

        def step():
            nonlocal state
            state, metrics = par.train_step(state, batch)
            return metrics
    else:
        variables = models.init_variables(model, jax.random.key(0), a.image_size)
        forward = lambda v, x: model.apply(v, x, train=False)
        f = jax.jit(forward) if row == "jax jit(model.apply)" else conv.jit_eval(forward)
        xj = jnp.asarray(x)

        def step():
            return f(variables, xj)
    compile_s, dt = measure(step, a, t0, jax.block_until_ready)
    plan = models.conv_plan(a.arch, a.image_size, width=a.width, impl=a.conv_impl,
                            train=a.mode == "train", dtype=a.dtype, batch=a.batch)
    return dict(img_per_s=a.batch * a.steps / dt, compile_s=compile_s, peak_mb=peak_mb(),
                conv_impl=models.describe_plan(plan), xla_flags=os.environ.get("XLA_FLAGS", ""))


def grad_optax_step(model, tx):
    """The training step a user writes: `jax.value_and_grad` of the cross-entropy of
    model.apply (dropout on; BatchNorm's statistics updated when the model has them), then
    tx's update. (params, stats, opt_state, x, y, rng) -> (params, stats, opt_state, loss),
    not jitted."""
    import jax
    import optax

    def loss_fn(params, stats, x, y, rng):
        v = {"params": params, **({"batch_stats": stats} if stats else {})}
        logits, new = model.apply(v, x, train=True, rngs={"dropout": rng},
                                  mutable=["batch_stats"] if stats else [])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new.get("batch_stats", stats)

    def train_step(params, stats, opt_state, x, y, rng):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, x, y, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss
    return train_step


def _optim_config():
    sys.path.insert(0, ROOT)
    from vgg_jax.configs import default
    o = default.get_config().optim
    o.update(schedule="constant", warmup_epochs=0, learning_rate=0.01)
    return o


def torch_vgg(a):
    """torchvision's VGG module layout for `a.arch`; below 224 (pool5 smaller than 7x7)
    fc6 reads the flattened pool5 unless a.torchvision_layout (see the module doc)."""
    import torch
    from torch import nn
    sys.path.insert(0, ROOT)
    from vgg_jax import models
    letter, bn = models.resolve_arch(a.arch)
    layers, c = [], 3
    for layer in models.layer_table(letter):
        if layer.kind == "conv":
            out = models.scaled(layer.channels, a.width)
            layers += [nn.Conv2d(c, out, layer.kernel, padding=layer.kernel // 2)]
            layers += [nn.BatchNorm2d(out)] if bn else []
            layers += [nn.ReLU(inplace=True)]
            c = out
        elif layer.kind == "lrn":
            layers.append(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0))
        else:
            layers.append(nn.MaxPool2d(2, 2))
    side = classifier_pool(a)
    if side == 7:
        pool, fc_in = nn.AdaptiveAvgPool2d(7), c * 49
    else:
        pool, fc_in = nn.Identity(), c * side * side
    return nn.Sequential(nn.Sequential(*layers), pool, nn.Flatten(),
                         nn.Linear(fc_in, a.fc), nn.ReLU(True), nn.Dropout(0.5),
                         nn.Linear(a.fc, a.fc), nn.ReLU(True), nn.Dropout(0.5),
                         nn.Linear(a.fc, 1000)).to(memory_format=torch.channels_last)


def run_torch(a, row: str) -> dict:
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    net = torch_vgg(a)
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    x, y = data(a)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last)
    y = torch.from_numpy(y).long()
    t0 = time.perf_counter()
    model = torch.compile(net) if row == "torch.compile" else net
    if a.mode == "train":
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    else:
        net.eval()

        def step():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype,
                                                 enabled=dtype != torch.float32):
                model(x)
    compile_s, dt = measure(step, a, t0)
    return dict(img_per_s=a.batch * a.steps / dt, compile_s=compile_s, peak_mb=peak_mb(),
                torch=torch.__version__)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--mode", default="both", choices=["train", "infer", "both"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=CHOICES.DTYPES)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed loops of --steps; the best counts")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--fc", type=int, default=4096)
    p.add_argument("--conv-impl", default="auto", choices=CHOICES.CONV_IMPLS)
    p.add_argument("--rows", default="", help="comma list of row names (default: all)")
    p.add_argument("--torchvision-layout", action="store_true",
                   help="torch keeps the upsampling 7x7 pool and a 25088-row fc6 below 224")
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for the tests")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.arch, a.image_size, a.batch, a.steps, a.width, a.fc = "vgg11", 32, 4, 2, 1 / 16, 32
        a.repeats = 1
        a.rows = a.rows or ("torch eager,jax grad+optax,jax grad+optax undonated,"
                            "jax train.py step,jax jit(model.apply),"
                            "jax jit(model.apply)" + NO_OPT_IN)
    return a


def main(argv=None):
    a = parse(argv)
    if a.worker:
        try:
            r = run_torch(a, a.worker) if a.worker.startswith("torch") else run_jax(a, a.worker)
        except Exception as e:  # e.g. torch.compile without a working compiler
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        print(json.dumps(r))
        return
    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    wanted = [r for r in a.rows.split(",") if r]
    rows = []
    for mode in modes:
        mine = []
        for name in ROWS[mode]:
            if wanted and name not in wanted:
                continue
            args = [sys.executable, os.path.abspath(__file__), "--worker", name, "--mode", mode,
                    "--arch", a.arch, "--image-size", str(a.image_size), "--batch", str(a.batch),
                    "--dtype", a.dtype, "--steps", str(a.steps), "--repeats", str(a.repeats),
                    "--width", str(a.width), "--fc", str(a.fc), "--conv-impl", a.conv_impl]
            args += ["--torchvision-layout"] if a.torchvision_layout else []
            out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{name} {mode} failed:\n{out.stderr[-3000:]}")
            mine.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), mode=mode,
                             row=name))
        torch_rows = [r for r in mine if r["row"].startswith("torch") and "img_per_s" in r]
        if torch_rows:  # the strongest ordinary PyTorch: the faster of eager and compile
            best = max(torch_rows, key=lambda r: r["img_per_s"])
            for r in mine:
                if "img_per_s" in r:
                    r.update(vs_torch=r["img_per_s"] / best["img_per_s"],
                             mem_vs_torch=r["peak_mb"] / best["peak_mb"], torch_row=best["row"])
        rows += mine
    setup = dict(arch=a.arch, batch=a.batch, image_size=a.image_size, dtype=a.dtype,
                 width=a.width, fc=a.fc, torchvision_layout=a.torchvision_layout,
                 cpus=len(os.sched_getaffinity(0)))
    if a.json:
        print(json.dumps(dict(setup, rows=rows)))
        return
    print(f"{a.arch} {a.image_size}x{a.image_size} batch {a.batch} {a.dtype}, width {a.width}, "
          f"{setup['cpus']} cores" + (", torch in torchvision layout" if a.torchvision_layout
                                      else ""))
    print("ratios: against the faster torch row of the same mode (named in the last column)")
    print(f"{'mode':<6} {'row':<26} {'img/s':>8} {'vs torch':>9} {'compile s':>9} "
          f"{'peak MB':>8} {'MB vs torch':>11}  torch row")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<6} {r['row']:<26} failed: {r['error']}")
            continue
        print(f"{r['mode']:<6} {r['row']:<26} {r['img_per_s']:>8.2f} "
              f"{r.get('vs_torch', float('nan')):>8.2f}x {r['compile_s']:>9.1f} "
              f"{r['peak_mb']:>8.0f} {r.get('mem_vs_torch', float('nan')):>10.2f}x  "
              f"{r.get('torch_row', '-')}")
    for r in rows:
        if "conv_impl" in r:
            print(f"{r['mode']} {r['row']}: {r['conv_impl']}")
            break


if __name__ == "__main__":
    main()
