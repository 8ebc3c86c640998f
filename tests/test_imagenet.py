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


def readme_chain(name="imagenet-chain"):
    """The command lines of one of the README's ImageNet blocks."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(rf"<!-- {name}.*?```bash\n(.*?)```", text, re.S)
    assert block, f"README has no {name} block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def run_chain(name, root, env):
    """Runs a README block's lines with runs/ and photo.jpg under `root`, tiny widths for
    train.py, --json for evaluate: [(argv, stdout)]."""
    photo = str(root / "photo.jpg")
    if not os.path.exists(photo):
        from sklearn.datasets import load_sample_images
        from PIL import Image
        Image.fromarray(load_sample_images().images[0]).save(photo)
    outputs = []
    for line in readme_chain(name):
        line = line.replace("runs/", f"{root}/runs/").replace("photo.jpg", photo) \
            .replace("boxes/", f"{root}/boxes/")
        argv = shlex.split(line, comments=True)
        if argv[0] == "vgg-jax":
            cmd = [sys.executable, "-m", "vgg_jax.cli", *argv[1:]]
            if argv[1] in ("evaluate", "localize"):
                cmd += ["--json"]
        else:
            assert argv[:2] == ["python", "train.py"], line
            cmd = [sys.executable, *argv[1:], *TINY_TRAIN]
        outputs.append((argv, run(cmd, env)))
    return outputs


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


@pytest.fixture(scope="module")
def chain(imagenet):
    """The README's ImageNet block run once: [(argv, stdout)]."""
    return run_chain("imagenet-chain", imagenet["root"], imagenet["env"])


def test_readme_chain_from_archives_to_named_predictions(imagenet, chain):
    root, outputs = imagenet["root"], chain
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


def test_readme_localisation_chain_from_box_archives_to_drawn_boxes(imagenet, chain):
    """The README's localisation block after the ImageNet one (its D256 is the classifier):
    the box archives prepared into `imagenet2012_localisation` (the XMLs' boxes of the
    image's class, as fractions of the size each XML states; training images without a
    box file left out), PCR from D256 with every layer trained, SCR with only fc6-fc8
    (Appendix A's two ways), their boxes pooled by the dense protocol, and the boxes drawn."""
    import tensorflow_datasets as tfds
    from vgg_jax import weights
    root, env = imagenet["root"], imagenet["env"]
    manual = os.path.join(imagenet["data_dir"], "downloads", "manual")
    written = tiny_imagenet.write_box_archives(manual, imagenet["layout"])
    outputs = run_chain("localisation-chain", root, env)
    prepare, pcr, scr, fused, drawn = (o for _, o in outputs)
    assert re.search(r"train: 24 examples", prepare) and re.search(r"validation: 8", prepare)
    synsets = tiny_imagenet.imagenet_synsets()
    sizes = imagenet["layout"]["sizes"]
    builder = tfds.builder("imagenet2012_localisation", data_dir=imagenet["data_dir"])
    for split in ("train", "validation"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            name = ex["file_name"].decode()
            stem, (h, w) = name.rsplit(".", 1)[0], sizes[name]
            want = [[y0 / h, x0 / w, y1 / h, x1 / w] for synset, (x0, y0, x1, y1)
                    in written[stem] if synset == synsets[ex["label"]]]
            np.testing.assert_allclose(ex["bboxes"], want, atol=1e-6)
    for out in (pcr, scr):
        assert re.search(r"validation localisation accuracy \(centre crop, the true class's "
                         r"box, IoU > 0.5\): .* on 8 images after 2 steps", out), out
    runs = root / "runs"
    d256, _ = weights.load_weights(str(runs / "D256"))
    for name, head, frozen in (("PCR256", "pcr", False), ("SCR256", "scr", True)):
        v, meta = weights.load_weights(str(runs / name))
        assert meta["model"]["box_head"] == head
        assert v["params"]["fc8"]["kernel"].shape == (32, 4 * (1000 if head == "pcr" else 1))
        moved = lambda layer: not np.array_equal(v["params"][layer]["kernel"],
                                                 d256["params"][layer]["kernel"])
        assert moved("fc6") and moved("fc7")  # fine-tuned from D256's: close, not equal
        assert np.abs(v["params"]["fc6"]["kernel"] - d256["params"]["fc6"]["kernel"]).max() \
            < 0.1 * np.abs(d256["params"]["fc6"]["kernel"]).max()
        assert moved("conv1_1") != frozen, name
    r = json.loads(fused.strip().splitlines()[-1])
    assert (r["protocol"], r["nets"], r["scales"], r["images"]) == ("dense", 2, [256, 384], 8)
    for key in ("top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err"):
        assert abs(r[key] * 8 - round(r[key] * 8)) < 1e-6, (key, r[key])
    assert r["top5_loc_err"] <= r["top1_loc_err"] and r["top5_cls_err"] <= r["top1_cls_err"]
    [image] = json.loads(drawn.strip().splitlines()[-1])
    names = tiny_imagenet.imagenet_names()
    assert len(image["guesses"]) == 5
    assert all(g["name"] == f"{names[g['label']]} ({synsets[g['label']]})"
               for g in image["guesses"])
    x0, y0, x1, y1 = image["guesses"][0]["box"]
    assert 0 <= x0 <= x1 <= 640 and 0 <= y0 <= y1 <= 427  # pixels of the 640x427 photo
    from PIL import Image
    assert Image.open(image["picture"]).size == (640, 427)
