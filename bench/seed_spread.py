"""The spread over seeds of every trained-quality number the test suite thresholds, so each
threshold can sit below it with a margin that holds on other CPUs (issue 46): kernels and
summation orders differ between CPUs (AVX2 / AVX-512, Intel / AMD), and a short training
run's result moves with them about as much as it moves with the seed.

    python bench/seed_spread.py --seeds 0,1,2,3 --out /tmp/spread   # ~3 min a seed, 2 cores

Per seed (config.seed), the runs the tests make:
- learning: configs/default.py whole (the README's main job; tests/test_train.py): test
  top-1 accuracy, and `vgg-jax transfer --limit 300` accuracy on its weights.
- protocols: the default config for 4 epochs (tests/test_evaluate.py's `trained`): top-1
  error of `vgg-jax evaluate` with each protocol at Q = 32.
- multi_label: 30 steps at width 1/8 with 4096-wide fc6/fc7 (tests/test_research.py's
  `digits_run`): `vgg-jax transfer` mAP on the four-quadrant multi-label digits, and the
  mAP of a random ranking (chance) on its test split.
Prints one JSON line per seed as it ends, then per quantity: mean, sample sd, min, max.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def command(*args) -> dict:
    r = subprocess.run(["vgg-jax", *map(str, args), "--json"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"vgg-jax {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def trained(out: str, seed: int, **changes) -> tuple[str, dict]:
    from conftest import load_config
    from vgg_jax import train
    c = load_config()
    c.seed, c.train.progress_bar = seed, False
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(c[section], field, value)
    return out, train.train_and_evaluate(c, out)


def one_seed(seed: int, out: str) -> dict:
    import numpy as np
    import tensorflow_datasets as tfds
    from helpers.multi_digits import VggMultiDigitsTest
    r = {"seed": seed}
    workdir, result = trained(f"{out}/learning{seed}", seed)
    r["learning_top1_acc"] = result["top1_acc"]
    r["learning_transfer_acc"] = command(
        "transfer", "--weights", workdir, "--data", "vgg_digits", "--train-split", "train",
        "--test-split", "test", "--limit", 300)["accuracy"]
    workdir, _ = trained(f"{out}/protocols{seed}", seed, train__num_epochs=4)
    for protocol in ("center", "dense", "multicrop", "dense+multicrop"):
        r[f"protocol_{protocol}_top1_err"] = command(
            "evaluate", "--weights", workdir, "--data", "vgg_digits", "--split", "test",
            "--protocol", protocol, "--scales", 32)["top1_err"]
    workdir, _ = trained(f"{out}/multi{seed}", seed, model__width=1 / 8,
                         model__fc_widths=(4096, 4096), train__max_steps=30,
                         train__log_every_steps=5)
    data_dir = f"{out}/tfds"
    if not os.path.isdir(os.path.join(data_dir, "vgg_multi_digits_test")):
        VggMultiDigitsTest(config="quadrants", data_dir=data_dir).download_and_prepare()
    name = "vgg_multi_digits_test/quadrants"
    truth = [set(ex["labels"].tolist()) for ex in tfds.as_numpy(
        tfds.builder(name, data_dir=data_dir).as_dataset(split="test", shuffle_files=False))]
    r["multi_label_chance"] = float(np.mean([np.mean([c in t for t in truth]) for c in range(3)]))
    r["multi_label_map"] = command("transfer", "--weights", workdir, "--data", name,
                                   "--data-dir", data_dir)["mAP"]
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--out", required=True, help="folder for the runs' workdirs")
    a = p.parse_args(argv)
    import vgg_jax
    vgg_jax.configure_cpu()  # as train.py and vgg-jax run
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        rows.append(one_seed(seed, a.out))
        print(json.dumps(rows[-1]), flush=True)
    for key in rows[0]:
        if key == "seed":
            continue
        values = [row[key] for row in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key:<36} mean {statistics.mean(values):.4f}  sd {sd:.4f}  "
              f"min {min(values):.4f}  max {max(values):.4f}")


if __name__ == "__main__":
    main()
