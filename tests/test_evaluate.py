"""The paper's test protocols, on a VGG-11-BN trained briefly on digits in this module."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, load_config
from vgg_jax import evaluate, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits"))
    c = load_config()
    c.train.num_epochs, c.train.progress_bar = 4, False
    train.train_and_evaluate(c, workdir)
    return workdir


def _digit_bytes(i=0, split="test"):
    from vgg_jax import input_pipeline
    src = input_pipeline.make_source("vgg_digits", split)
    for j, (raw, label) in enumerate(src.epoch_dataset(0, False, 0).as_numpy_iterator()):
        if j == i:
            return tf.constant(raw), int(label)


def _png(array):
    return tf.io.encode_png(tf.constant(array.astype(np.uint8)))


def test_dense_at_the_crop_size_equals_the_standard_forward(trained):
    net = evaluate.Net(trained)
    raw, _ = _digit_bytes()
    dense = evaluate.posterior(net, raw, "dense", [32], flip=False)
    image = evaluate.rescaled(raw, net.d, 32, crop=True)
    np.testing.assert_allclose(dense, net.softmax(image[None])[0], rtol=1e-5, atol=1e-7)


def test_flip_averaging(trained):
    net = evaluate.Net(trained)
    half = np.random.default_rng(0).integers(0, 255, (40, 20, 3))
    symmetric = _png(np.concatenate([half, half[:, ::-1]], axis=1))
    np.testing.assert_allclose(evaluate.posterior(net, symmetric, "dense", [40]),
                               evaluate.posterior(net, symmetric, "dense", [40], flip=False),
                               rtol=1e-5, atol=1e-7)
    general = _png(np.random.default_rng(1).integers(0, 255, (40, 48, 3)))
    image = evaluate.rescaled(general, net.d, 40, crop=False)
    two = (net.dense_softmax(image) + net.dense_softmax(image[:, ::-1])) / 2
    np.testing.assert_allclose(evaluate.posterior(net, general, "dense", [40]), two,
                               rtol=1e-5, atol=1e-7)


def test_multicrop_geometry_50_per_scale_on_a_5x5_grid_covering_the_corners():
    boxes = evaluate.multicrop_boxes(256, 341, 224)
    assert len(boxes) == 25 and len(set(boxes)) == 25
    assert {(0, 0), (0, 341 - 224), (256 - 224, 0), (256 - 224, 341 - 224)} <= set(boxes)
    image = np.random.default_rng(0).normal(size=(256, 341, 3)).astype(np.float32)
    batch = evaluate.multicrop_batch(image, 224)
    assert batch.shape == (50, 224, 224, 3)
    np.testing.assert_array_equal(batch[25 + 7], batch[7][:, ::-1])
    assert sum(len(evaluate.multicrop_batch(image, 224)) for _ in (256, 384, 512)) == 150


def test_paper_scale_rules():
    assert evaluate.paper_scales(s=256) == [224, 256, 288]
    assert evaluate.paper_scales(s_min=256, s_max=512) == [256, 384, 512]


def test_multi_scale_and_ensemble_average_the_separate_runs(trained):
    net = evaluate.Net(trained)
    raw, _ = _digit_bytes(3)
    sep = [evaluate.posterior(net, raw, "multicrop", [q]) for q in (32, 40, 48)]
    np.testing.assert_allclose(evaluate.posterior(net, raw, "multicrop", [32, 40, 48]),
                               np.mean(sep, axis=0), rtol=1e-6)
    both = evaluate.posterior(net, raw, "dense+multicrop", [40])
    np.testing.assert_allclose(both, (evaluate.posterior(net, raw, "dense", [40]) +
                                      evaluate.posterior(net, raw, "multicrop", [40])) / 2,
                               rtol=1e-6)
    other = evaluate.Net(trained)
    other.variables = {**other.variables, "params": {
        k: {kk: vv * 0.5 if k == "fc8" else vv for kk, vv in v.items()}
        for k, v in other.variables["params"].items()}}
    fused = evaluate.evaluate([net, other], "vgg_digits", "test", "center", [32], limit=5,
                              progress=False)
    assert fused["nets"] == 2 and fused["images"] == 5
    p1 = evaluate.posterior(net, raw, "center", [32])
    p2 = evaluate.posterior(other, raw, "center", [32])
    assert not np.allclose(p1, p2)  # fusion then averages two different posteriors


@pytest.mark.parametrize("protocol", evaluate.PROTOCOLS)
def test_every_protocol_runs_from_the_cli_and_beats_chance(trained, protocol):
    out = subprocess.run([sys.executable, "-m", "vgg_jax.cli", "evaluate", "--weights", trained,
                          "--data", "vgg_digits", "--split", "test", "--protocol", protocol,
                          "--scales", "32", "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["images"] == 360  # every example of the split exactly once
    assert r["top1_err"] < 0.9 * 0.5  # well below chance (0.9 for ten classes)


def test_training_time_validation_can_use_a_paper_protocol(tmp_path):
    c = load_config()
    c.model.width, c.model.fc_widths, c.train.progress_bar = 1 / 16, (16, 16), False
    c.train.max_steps, c.eval.protocol, c.eval.scales = 6, "dense", "32"
    r = train.train_and_evaluate(c, str(tmp_path / "w"))
    assert r["count"] == 360 and 0 <= r["top1_err"] <= 1
    c.eval.protocol = "tencrop"
    with pytest.raises(ValueError, match="unknown eval.protocol 'tencrop'"):
        train.validate(c)
