"""Every user mistake is one line and exit status 2, through the command line (issue 28):
`vgg-jax` in process (cli.main, what the console script calls), `train.py` as a process.
The weights are a tiny VGG-11 (channels / 16, 8-wide fc layers, 5 classes, 32x32)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, write_image_folder
from vgg_jax import cli, convert, models, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    kw = dict(arch="vgg11", num_classes=5, width=1 / 16, fc_widths=[8, 8], classifier_pool=1,
              in_channels=3)
    variables = models.init_variables(models.create_model(**kw), jax.random.key(0), 32)
    meta = convert.weights_meta(kw, "torchvision")
    meta["preprocessing"].update(image_size=32, eval_scale=32)
    weights.save_weights(str(root / "w"), variables, meta)
    photo, = write_image_folder(root / "photos", classes=("a",), per_class=1)
    return dict(w=str(root / "w"), photo=photo, root=root)


def one_line_error(capsys, argv, expected):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit 2 with usage + one line
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert expected in err[-1], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize("command", ["predict", "features", "activations", "saliency"])
def test_a_missing_image_file_is_one_line(tiny, capsys, command):
    missing = str(tiny["root"] / "nope.jpg")
    argv = [command, "--weights", tiny["w"], missing]
    argv += {"predict": [], "features": ["--layer", "fc7", "--out", str(tiny["root"] / "f.npy")],
             "activations": ["--out", str(tiny["root"] / "a.png")],
             "saliency": ["--out", str(tiny["root"] / "s.png")]}[command]
    line = one_line_error(capsys, argv, f"image file {missing} does not exist")
    assert line.startswith(f"vgg-jax {command}: error:")


def test_an_unknown_tfds_split_names_the_splits(tiny, capsys):
    one_line_error(capsys, ["evaluate", "--weights", tiny["w"], "--data", "vgg_digits",
                            "--split", "val"],
                   "vgg_digits has no split 'val'; its splits: test, train")


def test_missing_embeddings_file(tiny, capsys):
    one_line_error(capsys, ["plot-embeddings", str(tiny["root"] / "e.npz"), "--out",
                            str(tiny["root"] / "p.png")],
                   f"embeddings file {tiny['root'] / 'e.npz'} does not exist")
    np.savez(tiny["root"] / "other.npz", x=np.zeros(3))
    one_line_error(capsys, ["plot-embeddings", str(tiny["root"] / "other.npz"), "--out",
                            str(tiny["root"] / "p.png")], "has no 'embeddings' and 'labels'")


@pytest.mark.parametrize("argv, expected", [
    (["predict", "--weights", "W", "P", "--top", "-1"], "argument --top: must be at least 1, got -1"),
    (["predict", "--weights", "W", "P", "--top", "0"], "argument --top: must be at least 1, got 0"),
    (["evaluate", "--weights", "W", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["evaluate", "--weights", "W", "--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["evaluate", "--weights", "W", "--scales", "256,0"], "scales must be at least 1"),
    (["embed", "--weights", "W", "--batch-size", "-3", "--out", "x.npz"], "must be at least 1"),
    (["transfer", "--weights", "W", "--c", "0"], "argument --c: must be more than 0"),
    (["summary", "vgg16", "--width", "-1"], "argument --width: must be more than 0"),
    (["activations", "--weights", "W", "P", "--max-maps", "0", "--out", "a.png"],
     "argument --max-maps: must be at least 1")])
def test_out_of_range_integers_are_refused_by_the_parser(capsys, argv, expected):
    one_line_error(capsys, argv, expected)


@pytest.mark.parametrize("flag, module, extra", [("--from-torch", "torch", "vgg_jax[torch]"),
                                                 ("--from-onnx", "onnx", "vgg_jax[onnx]")])
def test_a_missing_optional_package_names_the_extra(tmp_path, capsys, monkeypatch, flag, module,
                                                    extra):
    path = tmp_path / ("w.pth" if module == "torch" else "w.onnx")
    path.write_bytes(b"0")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    one_line_error(capsys, ["convert", "--arch", "vgg11", flag, str(path), "--out",
                            str(tmp_path / "o")], f"pip install '{extra}'")


def test_writing_a_pth_without_torch_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    one_line_error(capsys, ["convert", "--from", tiny["w"], "--to-torch",
                            str(tmp_path / "w.pth")], "pip install 'vgg_jax[torch]'); or write a")


def train(tmp_path, *args):
    return subprocess.run([sys.executable, "train.py", f"--workdir={tmp_path}/wd", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_train_config_files_that_raise_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise RuntimeError('broken on purpose')\n")
    out = train(tmp_path, "--config", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"train.py: error: config file {bad} failed (line 2): RuntimeError: broken on purpose")
    out = train(tmp_path, "--config", "configs/imagenet.py:D,abc")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: config file configs/imagenet.py with argument 'D,abc' failed (line ")


def test_fewer_model_classes_than_the_dataset_has_is_refused(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    out = train(tmp_path, f"--config.data.dataset={tmp_path}/imgs", "--config.model.num_classes=2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"train.py: error: model.num_classes=2, but {tmp_path}/imgs has 3 classes (labels 0..2);"
        f" set model.num_classes=0 to take the dataset's")
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")
