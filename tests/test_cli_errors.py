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
        "train.py: error: config file configs/imagenet.py with argument 'D,abc' failed "
        "(vgg_jax/configs/imagenet.py line ")


def test_fewer_model_classes_than_the_dataset_has_is_refused(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    out = train(tmp_path, f"--config.data.dataset={tmp_path}/imgs", "--config.model.num_classes=2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"train.py: error: model.num_classes=2, but {tmp_path}/imgs has 3 classes (labels 0..2);"
        f" set model.num_classes=0 to take the dataset's")
    assert not os.path.exists(tmp_path / "wd" / "checkpoints")


def test_dense_views_below_the_nets_window_are_refused_naming_the_smallest_q(tiny, capsys):
    """The tiny net (classifier_pool 1) needs Q >= 32; Q = 20 used to give uniform scores."""
    one_line_error(capsys, ["predict", "--weights", tiny["w"], "--dense", "--q", "20",
                            tiny["photo"]],
                   "is too small for dense evaluation: this net's fc6 needs a 1x1 window of "
                   "pool5 (the view leaves 0x0); the smallest test scale Q for it is 32")
    assert weights.Net(tiny["w"]).smallest_dense_q() == 32
    assert cli.main(["predict", "--weights", tiny["w"], "--dense", "--q", "32", tiny["photo"]]) == 0


# ----------------------------------------------------------------------------- meanings

def test_an_explicit_compile_cache_wins_over_the_environment(monkeypatch, tmp_path):
    from vgg_jax import runtime
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, str(tmp_path / "env"))
    assert runtime.compile_cache_dir(str(tmp_path / "config")) == str(tmp_path / "config")
    assert runtime.compile_cache_dir("") == str(tmp_path / "env")
    assert runtime.compile_cache_dir("off") is None


def test_init_from_all_says_what_was_left_out_and_named_layers_must_exist(tmp_path, caplog):
    """E's weights into D: 'all' loads the shared layers and lists E's extra convs (and D's
    layers that start fresh); a named layer D lacks is refused."""
    import logging

    import ml_collections

    from vgg_jax.errors import UserError
    e = models.create_model("E", num_classes=3, width=1 / 16, fc_widths=(8, 8), classifier_pool=1)
    variables = models.init_variables(e, jax.random.key(0), 32)
    kw = dict(arch="vgg19", num_classes=3, width=1 / 16, fc_widths=[8, 8], classifier_pool=1)
    weights.save_weights(str(tmp_path / "e"), variables, convert.weights_meta(kw))
    d = models.create_model("D", num_classes=3, width=1 / 16, fc_widths=(8, 8), classifier_pool=1)
    params = models.init_variables(d, jax.random.key(1), 32)["params"]
    cfg = ml_collections.ConfigDict(dict(init_from=str(tmp_path / "e"), init_from_layers="all",
                                         init_exclude=""))
    with caplog.at_level(logging.INFO, logger="vgg_jax"):
        new, _ = weights.init_layers(params, {}, cfg)
    assert "its layers conv3_4, conv4_4, conv5_4 have no place in this model" in caplog.text
    np.testing.assert_array_equal(new["conv5_3"]["kernel"],
                                  variables["params"]["conv5_3"]["kernel"])
    cfg.init_from_layers = "conv1_1,conv3_4"
    with pytest.raises(UserError, match="init_from_layers names 'conv3_4', which this model "
                                        "does not have"):
        weights.init_layers(params, {}, cfg)


def test_weights_record_the_model_not_the_machines_conv_algorithm(tiny):
    import ml_collections
    model = models.create_model("vgg11", num_classes=5, width=1 / 16, fc_widths=(8, 8),
                                conv_impl="winograd")
    data = ml_collections.ConfigDict(dict(normalization="unit", mean=(0.0,), std=(1.0,),
                                          bgr=False, recipe="small", image_size=32,
                                          eval_scale=32, s_min=256, s_max=256, channels=3,
                                          flip=False))
    meta = weights.model_meta(model, data, [str(i) for i in range(5)])
    assert "conv_impl" not in meta["model"]
    old = dict(meta, model=dict(meta["model"], conv_impl="winograd"))  # written before
    assert weights.model_from_meta(old).conv_impl == "auto"


def test_ceil_mode_pools_accept_the_sizes_they_can_take():
    from vgg_jax.errors import UserError
    with pytest.raises(UserError, match="input 16x16 is smaller than 32x32: the five"):
        models.check_input((1, 16, 16, 3), 3)
    models.check_input((1, 16, 16, 3), 3, pool_ceil=True)  # 16 -> 8 -> 4 -> 2 -> 1 -> 1
    models.check_input((1, 194, 194, 3), 3, dense=True, pool_ceil=True)  # pool5 7x7
    with pytest.raises(UserError, match="smaller than 193x193 with ceil-mode pools: dense"):
        models.check_input((1, 192, 192, 3), 3, dense=True, pool_ceil=True)
    m = models.create_model("A", num_classes=2, width=1 / 16, fc_widths=(4, 4), classifier_pool=1,
                            pool_ceil=True)
    v = models.init_variables(m, jax.random.key(0), 32)
    assert m.apply(v, np.zeros((1, 20, 20, 3), np.float32)).shape == (1, 2)
