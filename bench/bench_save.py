"""What a checkpoint costs the training loop: the time of five training steps that start
with a save, against five steps without one, in the same run, through the run's own
objects (`vgg_jax.train.setup`: its jitted step, its orbax CheckpointManager, its
`checkpoint.save`).

    python bench/bench_save.py [--arch D] [--repeats 3] [--workdir DIR] [--json]

VGG-16 at 32x32, batch 128, with the paper's classifier (pool5 to 7x7, fc 4096-4096, 10
classes): 1.1 GB of parameters and momentum. Rows: no save; an asynchronous save (how
train.py saves: the step goes on while orbax writes); a save that waits until written
(how train.py saved before 2026-12-07). `written_s` is how long the asynchronous write
took to finish after the save began (the next save waits for it). Median of --repeats.
The workdir is local disk (a temporary folder unless --workdir).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="D")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--classifier-pool", type=int, default=7)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vgg_jax
    vgg_jax.runtime.quiet_tensorflow()  # as train.py does
    vgg_jax.configure_cpu()
    import jax
    from machine import cpu_line
    from vgg_jax import checkpoint, train
    from vgg_jax.configs.default import get_config

    config = get_config()
    config.model.update(arch=a.arch, width=a.width, fc_widths=(4096, 4096),
                        classifier_pool=a.classifier_pool)
    config.optim.update(batch_size=a.batch)
    config.train.update(progress_bar=False)
    workdir = a.workdir or tempfile.mkdtemp(prefix="vgg_jax_bench_save_")
    run = train.setup(config, workdir)
    state = run.state
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

    def steps(state, n):
        for _ in range(n):
            state, metrics = run.par.train_step(state, run.par.global_batch(next(run.it)))
        jax.block_until_ready((state, metrics))
        return state

    state = steps(state, 2)  # compile, warm up
    times = {"no save": [], "async save": [], "save, waited": []}
    written, step = [], 1000
    for _ in range(a.repeats):
        for kind in times:
            run.mngr.wait_until_finished()  # each row starts with no write in flight
            t0 = time.perf_counter()
            if kind != "no save":
                step += 1
                checkpoint.save(run.mngr, step, state, {"per_process": []},
                                wait=kind == "save, waited")
            state = steps(state, a.steps)
            times[kind].append(time.perf_counter() - t0)
            if kind == "async save":
                run.mngr.wait_until_finished()
                written.append(time.perf_counter() - t0)
    run.mngr.close()
    base = statistics.median(times["no save"])
    rows = [dict(row=k, seconds=round(statistics.median(v), 3),
                 vs_no_save=round(statistics.median(v) / base, 3)) for k, v in times.items()]
    out = dict(machine=cpu_line(), arch=a.arch, batch=a.batch, steps=a.steps,
               state_gb=round(state_bytes / 1e9, 2), repeats=a.repeats,
               async_written_s=round(statistics.median(written), 2), rows=rows)
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['machine']}; {a.arch} at 32x32, batch {a.batch}, {out['state_gb']} GB of "
          f"params + momentum; {a.steps} steps, median of {a.repeats}")
    for r in rows:
        print(f"{r['row']:>14}: {r['seconds']:7.3f} s  {r['vs_no_save']:.3f}x")
    print(f"the asynchronous write finished {out['async_written_s']} s after the save began")


if __name__ == "__main__":
    main()
