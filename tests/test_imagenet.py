"""ImageNet as users bring it: the official archive layout, prepared with `vgg-jax prepare`,
then the README's chain run line by line (A at S=256 -> D pre-initialised from A -> S=384
-> S in [256, 512] -> dense+multicrop at the paper's Q -> fusion -> predict with names).

The archives are tiny (scikit-learn's two photos, cropped: 8 synsets x 4 training images,
8 validation images) and the nets run at width 1/16 with 32-wide FC layers for two steps,
because XLA's CPU convolutions are slow; everything else is what a user runs."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from helpers import tiny_imagenet

TINY_TRAIN = ["--config.model.width=0.0625", "--config.model.fc_widths=(32, 32)",
              "--config.optim.batch_size=4", "--config.train.max_steps=2",
              "--config.train.progress_bar=False", "--config.eval.batch_size=8",
              "--config.model.conv_impl=xla"]  # compiles faster than Winograd's layers


def readme_chain():
    """The command lines of the README's ImageNet block."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- imagenet-chain.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no imagenet-chain block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def run(cmd, env, timeout=600):
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    data_dir = str(root / "tfds")
    layout = tiny_imagenet.write_archives(os.path.join(data_dir, "downloads", "manual"))
    env = dict(os.environ, TFDS_DATA_DIR=data_dir,
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"))  # the three D runs share
    return dict(root=root, data_dir=data_dir, layout=layout, env=env)


def test_prepare_refuses_missing_archives_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vgg_jax.cli", "prepare", "imagenet2012",
                          "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2
    err = [line for line in out.stderr.splitlines() if line.startswith("vgg-jax prepare")]
    assert len(err) == 1 and "ILSVRC2012_img_train.tar" in err[0]
    assert "ILSVRC2012_img_val.tar" in err[0] and os.path.join(str(tmp_path), "downloads",
                                                                  "manual") in err[0]
    assert "Traceback" not in out.stderr


def test_readme_chain_from_archives_to_named_predictions(imagenet):
    from sklearn.datasets import load_sample_images
    from PIL import Image
    root, env = imagenet["root"], imagenet["env"]
    photo = str(root / "photo.jpg")
    Image.fromarray(load_sample_images().images[0]).save(photo)
    outputs = []
    for line in readme_chain():
        line = line.replace("runs/", f"{root}/runs/").replace("photo.jpg", photo)
        argv = shlex.split(line)
        if argv[0] == "vgg-jax":
            cmd = [sys.executable, "-m", "vgg_jax.cli", *argv[1:]]
            if argv[1] == "evaluate":
                cmd += ["--json"]
        else:
            assert argv[:2] == ["python", "train.py"], line
            cmd = [sys.executable, *argv[1:], *TINY_TRAIN]
        outputs.append((argv, run(cmd, env)))

    prepare, *trains = [o for a, o in outputs if a[1] in ("prepare", "train.py")]
    assert re.search(r"train: 32 examples", prepare) and re.search(r"validation: 8", prepare)
    for out in trains:  # each stage trained and validated on the validation split
        assert re.search(r"validation top-1 accuracy: .* on 8 images after 2 steps", out), out
    runs = root / "runs"
    from vgg_jax import weights
    a, _ = weights.load_weights(str(runs / "A256"))
    d256, meta = weights.load_weights(str(runs / "D256"))
    assert meta["model"]["arch"] == "vgg16"
    # D's fc6 after two steps stays close to A's (copied in), not a fresh init.
    drift = np.abs(d256["params"]["fc6"]["kernel"] - a["params"]["fc6"]["kernel"]).max()
    assert drift < 0.1 * np.abs(a["params"]["fc6"]["kernel"]).max()
    for stage, s_range in (("D384", [384, 384]), ("D256-512", [256, 512])):
        config = json.loads((runs / stage / "config.json").read_text())
        assert [config["data"]["s_min"], config["data"]["s_max"]] == s_range

    evals = [json.loads(o.strip().splitlines()[-1]) for a, o in outputs if a[1] == "evaluate"]
    single, fused = evals
    assert single["protocol"] == "dense+multicrop" and single["scales"] == [256, 384, 512]
    assert fused["nets"] == 2 and fused["protocol"] == "dense"
    for r in evals:
        assert r["split"] == "validation" and r["images"] == 8 and r["skipped"] == 0
        # counts over exactly the 8 validation images (a 9th view or a lost image would
        # give another denominator), and top-5 can only be as wrong as top-1
        for key in ("top1_err", "top5_err"):
            assert abs(r[key] * 8 - round(r[key] * 8)) < 1e-6, (key, r[key])
        assert r["top5_err"] <= r["top1_err"]

    predicted = outputs[-1][1]
    names = dict(zip(tiny_imagenet.imagenet_synsets(), tiny_imagenet.imagenet_names()))
    lines = re.findall(r"^\s+[0-9.]+\s+(.+) \((n\d{8})\)$", predicted, re.M)
    assert len(lines) == 5, predicted
    assert all(names[synset] == name for name, synset in lines)
