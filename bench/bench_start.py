"""Time to first step of `python train.py`, a first run (empty compile cache) and a second
run of the same command (JAX's persistent compilation cache, on by default, filled by the
first). Each run uses a fresh workdir, so nothing but the cache is shared.

    python bench/bench_start.py [--json]

"Time to first step" is from starting the process to the first line of metrics.jsonl
(train.log_every_steps=1): imports, data, model init, compiling the train step, one step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "default (VGG-11-BN x1/4, digits 32x32, batch 64)": [],
    "VGG-16 (full width, digits 32x32, batch 128)": [
        "--config.model.arch=vgg16", "--config.model.width=1.0",
        "--config.model.fc_widths=(4096, 4096)", "--config.optim.batch_size=128"],
}


def time_to_first_step(workdir: str, flags, cache: str, timeout: float = 900) -> float:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}",
           "--config.train.log_every_steps=1", "--config.train.progress_bar=False", *flags]
    env = dict(os.environ, VGG_JAX_COMPILE_CACHE=cache)
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while time.time() - t0 < timeout:
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                return time.time() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"train.py ended before its first step:\n"
                                   f"{proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
        raise TimeoutError(f"no step after {timeout} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--cases", default="all", help="'all' or 'default'")
    a = p.parse_args()
    base = tempfile.mkdtemp(prefix="vgg_jax_start_")
    rows = []
    try:
        for i, (name, flags) in enumerate(CASES.items()):
            if a.cases == "default" and i:
                break
            cache = os.path.join(base, f"cache{i}")
            first = time_to_first_step(os.path.join(base, f"w{i}a"), flags, cache)
            second = time_to_first_step(os.path.join(base, f"w{i}b"), flags, cache)
            rows.append(dict(case=name, first_s=round(first, 2), second_s=round(second, 2),
                             speedup=round(first / second, 2)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        print(json.dumps(dict(rows=rows)))
        return
    print(f"{'command':<52} {'first run':>10} {'second run':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['case']:<52} {r['first_s']:>9.1f}s {r['second_s']:>10.1f}s "
              f"{r['speedup']:>5.1f}x")


if __name__ == "__main__":
    main()
