"""The localisation net of Appendix A: its objective (the Euclidean box loss and the
IoU > 0.5 count, on worked numbers), its data errors in one line, and training on the
bundled canvas digits through train.py."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from vgg_jax import boxes, objectives


def _target():
    # two images: a box (x0, y0, x1, y1) each, padded with empty boxes to 3
    b = np.zeros((2, 3, 4), np.float32)
    b[0, 0] = [0.2, 0.2, 0.6, 0.6]
    b[1, 0] = [0.5, 0.1, 0.9, 0.3]
    b[1, 1] = [0.0, 0.0, 0.2, 0.2]  # a second object of the class
    return {"label": jnp.asarray([1, 2]), "boxes": jnp.asarray(b)}


def test_box_loss_is_half_the_squared_distance_of_the_true_classs_box():
    target = _target()
    # PCR: (N, 3 classes, 4); the true class's box is the one that counts
    out = np.zeros((2, 3, 4), np.float32)
    out[0, 1] = [0.4, 0.4, 0.4, 0.4]      # exact: centred (0.4, 0.4, 0.4, 0.4)
    out[1, 2] = [0.7, 0.2, 0.4, 0.3]      # h off by 0.1 -> 0.5 * 0.01
    out[0, 0] = out[1, 0] = 9.0           # other classes' boxes: ignored
    loss = objectives.box_loss(jnp.asarray(out), target)
    np.testing.assert_allclose(loss, [0.0, 0.005], atol=1e-7)
    # SCR: one box for every class
    scr = jnp.asarray(out[:, 1:2])
    want = 0.5 * np.sum((out[1, 1] - np.array([0.7, 0.2, 0.4, 0.2])) ** 2)
    np.testing.assert_allclose(objectives.box_loss(scr, target), [0.0, want], rtol=1e-6,
                               atol=1e-7)
    g = jax.grad(lambda o: objectives.box_loss(o, target).sum())(jnp.asarray(out))
    np.testing.assert_allclose(g[1, 2], [0, 0, 0, 0.1], atol=1e-6)
    assert not np.asarray(g[:, 0]).any()  # no gradient into other classes' boxes


def test_a_box_counts_when_it_overlaps_any_box_of_the_image_by_more_than_one_half():
    target = _target()
    out = np.zeros((2, 3, 4), np.float32)
    out[0, 1] = boxes.centred(np.array([0.25, 0.2, 0.65, 0.6]))  # IoU 0.78: right
    out[1, 2] = boxes.centred(np.array([0.0, 0.0, 0.2, 0.25]))  # the second object: right
    np.testing.assert_array_equal(objectives.box_correct(jnp.asarray(out), target), [1, 1])
    out[0, 1] = boxes.centred(np.array([0.4, 0.2, 0.8, 0.6]))  # IoU 1/3: wrong
    out[1, 2] = boxes.centred(np.array([0.5, 0.1, 0.9, 0.3]))  # but class 0's slot is 2's
    np.testing.assert_array_equal(objectives.box_correct(jnp.asarray(out), target), [0, 1])
    # padding boxes are empty: a prediction of an empty box is never right
    out[1, 2] = 0.0
    np.testing.assert_array_equal(objectives.box_correct(jnp.asarray(out), target), [0, 0])


def _train(workdir, *args, config="SCR", timeout=900):
    return subprocess.run([sys.executable, "train.py", f"--workdir={workdir}",
                           f"--config=configs/digits_localisation.py:{config}",
                           "--config.train.progress_bar=False", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("change,message", [
    (["--config.data.dataset=vgg_digits"],
     "vgg_digits has no boxes (a 'bboxes' feature, or 'objects' with a 'bbox'): a box head "
     "(model.box_head) trains on a localisation dataset such as vgg_digits_canvas"),
    (["--config.eval.protocol=dense"],
     "eval.protocol='dense': a box net (model.box_head='scr') validates with the paper's "
     "centre-crop protocol (eval.protocol='center', the box of the true class)"),
    (["--config.model.box_head=box"],
     "model.box_head='box': valid are '' (a classifier), 'scr' (one box for all classes) "
     "and 'pcr' (a box per class)"),
])
def test_box_net_mistakes_are_one_line(tmp_path, change, message):
    r = _train(tmp_path / "w", *change, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def _accuracy(stdout):
    line = [l for l in stdout.splitlines() if "localisation accuracy" in l][-1]
    assert line.startswith("test localisation accuracy (centre crop, the true class's box, "
                           "IoU > 0.5): "), line
    return float(line.split(": ")[1].split("%")[0]) / 100


def test_scr_and_pcr_nets_train_on_the_canvas_digits_and_find_them(tmp_path):
    """train.py with `digits_localisation:SCR` for 8 epochs: at least 90% of the test
    boxes right (IoU > 0.5 on the centre view), where the best constant box gets 14%
    (test_boxes). Margin: 8 epochs measured 94.7, 94.7, 92.8% over seeds 0-2 on 2026-12-07
    (2-core AMD EPYC with AVX-512; bench/RESULTS.md), so 2.8 points above the bar at the
    worst seed. PCR (a box per class, each class's box sees a tenth of the data) after 3
    epochs: 49.7, 55.3, 55.3% over seeds 0-2; asserted >= 35%, 2.5x the best constant box
    and 14.7 points under the worst seed."""
    r = _train(tmp_path / "scr", "--config.train.num_epochs=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _accuracy(r.stdout) >= 0.90, r.stdout
    meta = json.loads((tmp_path / "scr" / "meta.json").read_text())
    assert meta["model"]["box_head"] == "scr"
    # a box net has no class scores: the commands that need them say so
    image = tmp_path / "canvas.png"
    from PIL import Image
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    p = subprocess.run(["vgg-jax", "predict", "--weights", str(tmp_path / "scr"), str(image)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "vgg-jax predict: error: these weights are a localisation net "
        "(model.box_head='scr')"), p.stderr[-2000:]
    # `vgg-jax evaluate --task localisation`: the same centre views and boxes as training's
    # validation, so the same count
    e = subprocess.run(["vgg-jax", "evaluate", "--weights", str(tmp_path / "scr"), "--data",
                        "vgg_digits_canvas", "--task", "localisation", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-2000:]
    got = json.loads(e.stdout.strip().splitlines()[-1])
    assert got["images"] == 360 and got["box_head"] == "scr"
    wrong = got["true_class_loc_err"] * 360  # a count of images, printed to 0.01% there
    assert abs(wrong - round(wrong)) < 1e-6
    assert got["true_class_loc_err"] == pytest.approx(1 - _accuracy(r.stdout), abs=5e-5)
    _check_guesses_with_a_classifier(tmp_path / "scr")
    r = _train(tmp_path / "pcr", "--config.train.num_epochs=3", config="PCR")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _accuracy(r.stdout) >= 0.35, r.stdout


def _check_guesses_with_a_classifier(workdir):
    """localise's top-1/top-5 localisation error with a classifier's five guesses, against
    the rule computed here image by image: a guess is right when its class is the image's
    and the (SCR: only) box overlaps the true box by IoU > 0.5. The classifier is the
    box net's trunk with a random 10-class fc8, so its guesses are often wrong and both
    outcomes occur."""
    from vgg_jax import eval_data, input_pipeline, localise, weights
    box = weights.Net(str(workdir))
    variables = jax.tree.map(np.asarray, box.variables)
    rng = np.random.default_rng(0)
    variables["params"]["fc8"] = {"kernel": rng.normal(size=(256, 10)).astype(np.float32),
                                  "bias": np.zeros(10, np.float32)}
    meta = json.loads(json.dumps(box.meta))
    del meta["model"]["box_head"]
    clf = weights.Net(model=weights.model_from_meta(meta), variables=variables, meta=meta)
    r = localise.evaluate_centre(box, "vgg_digits_canvas", "test", classifier=clf, limit=96)
    source = input_pipeline.make_source("vgg_digits_canvas", "test", boxes=True)
    n, right1, right5 = 0, 0, 0
    for batch in eval_data.eval_batches(source, box.d, 32, limit=96):
        k = int(batch["mask"].sum())
        top5 = np.argsort(-clf.posteriors(batch["image"]), axis=1)[:k, :5]
        cx, cy, w, h = box.outputs(batch["image"])[:k, 0].T
        for i in range(k):
            x0, y0, x1, y1 = batch["boxes"][i, 0]
            iw = max(0.0, min(cx[i] + w[i] / 2, x1) - max(cx[i] - w[i] / 2, x0))
            ih = max(0.0, min(cy[i] + h[i] / 2, y1) - max(cy[i] - h[i] / 2, y0))
            iou = iw * ih / (w[i] * h[i] + (x1 - x0) * (y1 - y0) - iw * ih)
            hits = [c == batch["label"][i] and iou > 0.5 for c in top5[i]]
            right1 += hits[0]
            right5 += any(hits)
            n += 1
    assert r["images"] == n == 96
    assert r["top1_loc_err"] == pytest.approx(1 - right1 / n, abs=1e-9)
    assert r["top5_loc_err"] == pytest.approx(1 - right5 / n, abs=1e-9)
    assert 0 < right5 < n and r["top5_loc_err"] <= r["top1_loc_err"]
