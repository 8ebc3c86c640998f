"""Fault injection: SIGKILL a short training run at random moments (some of them while a
checkpoint is being written), resume it, and compare the final parameters bit for bit
with an uninterrupted run of the same command.

    python bench/fault_injection.py [--trials 20] [--steps 48] [--json]

Each trial starts the run, kills it (at a random time within the uninterrupted run's
duration, redrawn within the trial's own run time if that run finished first, or, every
other trial, the moment orbax starts writing a checkpoint), starts
it again on the same workdir until it finishes, and compares. Prints one row per trial
and "N/T bit-equal". The models are tiny (width 1/16 on the bundled digits) so a trial
takes seconds; the compile cache is shared by all runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=0.0625", "--config.model.fc_widths=(16, 16)",
        "--config.optim.batch_size=32", "--config.train.progress_bar=False",
        "--config.optim.warmup_epochs=0", "--config.optim.schedule=constant",
        "--config.train.log_every_steps=4", "--config.train.eval_every_epochs=1000",
        "--config.train.checkpoint_every_steps=4"]


def command(workdir, steps):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *TINY,
            f"--config.train.max_steps={steps}"]


def finish(workdir, steps):
    out = subprocess.run(command(workdir, steps), cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"run in {workdir} failed:\n{out.stderr[-3000:]}")
    return out


def saving(workdir) -> bool:
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any("tmp" in n for n in os.listdir(ckpts))


def kill_once(workdir, steps, at: float | None, deadline: float):
    """Start the run; SIGKILL it after `at` seconds, or (at=None) as soon as a checkpoint
    write is in progress. Returns (seconds it ran, whether it was killed, whether a save
    was in progress at the kill)."""
    proc = subprocess.Popen(command(workdir, steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < deadline:
        if (at is not None and time.time() - t0 >= at) or (at is None and saving(workdir)):
            during_save = saving(workdir)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return time.time() - t0, True, during_save
        time.sleep(0.002)
    proc.wait()
    return time.time() - t0, False, False


def final_params(workdir):
    from vgg_jax import weights
    variables, meta = weights.load_weights(workdir)
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(variables)], meta["step"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rng = random.Random(a.seed)
    base = tempfile.mkdtemp(prefix="vgg_jax_faults_")
    os.environ.setdefault("VGG_JAX_COMPILE_CACHE", os.path.join(base, "compile_cache"))
    try:
        finish(os.path.join(base, "warm"), a.steps)  # fills the compile cache
        t0 = time.time()
        finish(os.path.join(base, "ref"), a.steps)
        duration = time.time() - t0
        ref, ref_step = final_params(os.path.join(base, "ref"))
        rows = []
        for trial in range(a.trials):
            workdir = os.path.join(base, f"trial{trial}")
            at = None if trial % 2 else rng.uniform(0.0, duration)
            ran, killed, during_save = kill_once(workdir, a.steps, at, deadline=4 * duration)
            for _ in range(3):  # this run beat the moment (runs vary): a moment within it
                if killed or at is None:
                    break
                shutil.rmtree(workdir)
                at = rng.uniform(0.0, 0.9 * ran)
                ran, killed, during_save = kill_once(workdir, a.steps, at, deadline=4 * duration)
            saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                           if n.isdigit()) if os.path.isdir(os.path.join(workdir,
                                                                         "checkpoints")) else []
            finish(workdir, a.steps)
            got, step = final_params(workdir)
            equal = step == ref_step and all(np.array_equal(x, y) for x, y in zip(ref, got))
            rows.append(dict(trial=trial, kill="during a save" if at is None else f"at {at:.2f} s",
                             killed=killed, during_save=during_save,
                             checkpoints_at_kill=saved, bit_equal=bool(equal)))
            shutil.rmtree(workdir, ignore_errors=True)
        n_equal = sum(r["bit_equal"] for r in rows)
        summary = dict(trials=a.trials, steps=a.steps, bit_equal=n_equal,
                       killed=sum(r["killed"] for r in rows),
                       killed_during_save=sum(r["during_save"] for r in rows),
                       uninterrupted_s=round(duration, 2), rows=rows)
        if a.json:
            print(json.dumps(summary))
        else:
            print(f"{'trial':>5} {'kill':<16} {'killed':>6} {'in save':>7} "
                  f"{'checkpoints at kill':<22} {'bit-equal':>9}")
            for r in rows:
                print(f"{r['trial']:>5} {r['kill']:<16} {str(r['killed']):>6} "
                      f"{str(r['during_save']):>7} {str(r['checkpoints_at_kill']):<22} "
                      f"{str(r['bit_equal']):>9}")
            print(f"{n_equal}/{a.trials} bit-equal ({summary['killed']} killed, "
                  f"{summary['killed_during_save']} during a save; {a.steps} steps, "
                  f"uninterrupted run {duration:.1f} s)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
