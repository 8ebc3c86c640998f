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


@pytest.fixture(scope="module")
def scr(tmp_path_factory):
    """train.py with `digits_localisation:SCR` for 8 epochs: (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("scr") / "w"
    r = _train(workdir, "--config.train.num_epochs=8")
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r.stdout


@pytest.fixture(scope="module")
def classifier(scr, tmp_path_factory):
    """A 10-class classifier saved as a weights directory: the SCR net's trunk with a
    random fc8, so its guesses are often wrong and both outcomes of a guess occur."""
    from vgg_jax import store, weights
    box = weights.Net(str(scr[0]))
    variables = jax.tree.map(np.asarray, box.variables)
    rng = np.random.default_rng(0)
    variables["params"]["fc8"] = {"kernel": rng.normal(size=(256, 10)).astype(np.float32),
                                  "bias": np.zeros(10, np.float32)}
    meta = json.loads(json.dumps(box.meta))
    del meta["model"]["box_head"]
    path = str(tmp_path_factory.mktemp("classifier") / "clf")
    store.save_weights(path, variables, meta)
    return path


def test_scr_net_trains_on_the_canvas_digits_and_finds_them(scr, tmp_path):
    """At least 90% of the test boxes right (IoU > 0.5 on the centre view) after 8 epochs,
    where the best constant box gets 14% (test_boxes). Margin: 8 epochs measured 94.7,
    94.7, 92.8% over seeds 0-2 on 2026-12-07 (2-core AMD EPYC with AVX-512;
    bench/RESULTS.md), so 2.8 points above the bar at the worst seed."""
    workdir, stdout = scr
    assert _accuracy(stdout) >= 0.90, stdout
    meta = json.loads((workdir / "meta.json").read_text())
    assert meta["model"]["box_head"] == "scr"
    # a box net has no class scores: the commands that need them say so
    image = tmp_path / "canvas.png"
    from PIL import Image
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    p = subprocess.run(["vgg-jax", "predict", "--weights", str(workdir), str(image)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "vgg-jax predict: error: these weights are a localisation net "
        "(model.box_head='scr')"), p.stderr[-2000:]
    # `vgg-jax evaluate --task localisation`: the same centre views and boxes as training's
    # validation, so the same count; the dense protocol at Q = 64 has one position whose
    # window is the whole canvas, so the same again
    for protocol in ("center", "dense"):
        e = subprocess.run(["vgg-jax", "evaluate", "--weights", str(workdir), "--data",
                            "vgg_digits_canvas", "--task", "localisation", "--protocol",
                            protocol, "--json"], capture_output=True, text=True, timeout=300)
        assert e.returncode == 0, e.stderr[-2000:]
        got = json.loads(e.stdout.strip().splitlines()[-1])
        assert got["images"] == 360 and got["box_head"] == "scr"
        wrong = got["true_class_loc_err"] * 360  # a count of images, printed to 0.01% there
        assert abs(wrong - round(wrong)) < 1e-6
        assert got["true_class_loc_err"] == pytest.approx(1 - _accuracy(stdout), abs=5e-5)


def test_pcr_net_trains_on_the_canvas_digits(tmp_path):
    """PCR (a box per class, each class's box sees a tenth of the data) after 3 epochs:
    49.7, 55.3, 55.3% over seeds 0-2 (2026-12-07, as above); asserted >= 35%, 2.5x the best
    constant box and 14.7 points under the worst seed."""
    r = _train(tmp_path / "pcr", "--config.train.num_epochs=3", config="PCR")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _accuracy(r.stdout) >= 0.35, r.stdout


def test_centre_guesses_with_a_classifier_follow_ilsvrcs_rule(scr, classifier):
    """localise's top-1/top-5 localisation error with a classifier's five guesses, against
    the rule computed here image by image: a guess is right when its class is the image's
    and the (SCR: only) box overlaps the true box by IoU > 0.5."""
    from vgg_jax import eval_data, input_pipeline, localise, weights
    box, clf = weights.Net(str(scr[0])), weights.Net(classifier)
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


def test_window_boxes_place_each_positions_box_in_its_window_of_the_image():
    """A 2x3 dense map at STRIDE 32 over a 96x128 image, 64-pixel windows: the box (cx, cy,
    w, h) = (0.5, 0.25, 0.5, 0.5) of its window is, at position (i, j), the pixels x 16..48
    and y 0..32 of the window starting at (32 i, 32 j)."""
    from vgg_jax import localise
    out = np.tile(np.array([0.5, 0.25, 0.5, 0.5]), (2, 3, 1, 1))
    frac, centres = localise.window_boxes(out, 96, 128, 64)
    assert frac.shape == (6, 1, 4) and centres.shape == (6, 2)
    for k, (i, j) in enumerate([(i, j) for i in range(2) for j in range(3)]):
        want = np.array([32 * j + 16, 32 * i, 32 * j + 48, 32 * i + 32]) / [128, 96, 128, 96]
        np.testing.assert_allclose(frac[k, 0], want, rtol=1e-12)
        np.testing.assert_array_equal(centres[k], [32 * i + 32, 32 * j + 32])


def test_dense_protocol_at_one_position_is_the_centre_protocol_and_fusing_a_net_with_itself_changes_nothing(scr, classifier):
    """At Q = 64 the canvas net's dense map has one position, whose window is the whole
    image: the dense guesses (the classifier's five best classes on its dense scores, the
    merged box of each) are the centre protocol's, so every error is the same; pooling a
    net's boxes with its own copies merges each box with its twin into the same box."""
    from vgg_jax import localise, weights
    box, clf = weights.Net(str(scr[0])), weights.Net(classifier)
    centre = localise.evaluate_centre(box, "vgg_digits_canvas", "test", classifier=clf,
                                      limit=96)
    dense = localise.evaluate_dense([box], "vgg_digits_canvas", "test", [64], classifier=clf,
                                    limit=96)
    fused = localise.evaluate_dense([box, box], "vgg_digits_canvas", "test", [64],
                                    classifier=clf, limit=96)
    keys = ("top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err")
    assert dense["images"] == fused["images"] == 96 and dense["protocol"] == "dense"
    for k in keys:
        assert dense[k] == pytest.approx(centre[k], abs=1e-9), k
        assert fused[k] == pytest.approx(dense[k], abs=1e-9), k
    assert 0 < dense["top5_loc_err"] < 1


def test_localize_draws_the_five_guesses_of_each_image(scr, classifier, tmp_path):
    """`vgg-jax localize` in a fresh process: each image's five guesses (the classifier's
    five best classes, each with its merged dense box in pixels) as localise computes them
    here, and a picture per image with the boxes drawn in."""
    from PIL import Image
    from vgg_jax import localise, weights
    from vgg_jax.datasets.canvas import canvas_arrays
    images = canvas_arrays("test")[0][:2]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"canvas{i}.png"))
        Image.fromarray(image).save(paths[-1])
    r = subprocess.run(["vgg-jax", "localize", "--weights", str(scr[0]), "--classifier",
                        classifier, *paths, "--out", str(tmp_path / "out"), "--scales", "64,96",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    box, clf = weights.Net(str(scr[0])), weights.Net(classifier)
    for result, image in zip(got, images):
        want = localise.dense_guesses([box], image, [64, 96], classifier=clf)
        assert [g["label"] for g in result["guesses"]] == [c for c, _, _ in want]
        for g, (_, corners, score) in zip(result["guesses"], want):
            np.testing.assert_allclose(g["box"], np.clip(boxes.ordered(corners), 0, 1) * 64,
                                       atol=0.006)
            assert g["score"] == pytest.approx(score, rel=1e-6)
        picture = np.asarray(Image.open(result["picture"]).convert("RGB"))
        assert picture.shape == (256, 256, 3)  # 64 px drawn 4x
        first = np.array([0xe6, 0x19, 0x4b])  # guess 1's colour, in no digit
        assert (picture == first).all(axis=-1).sum() > 100
    r = subprocess.run(["vgg-jax", "localize", "--weights", str(scr[0]), paths[0], "--out",
                        str(tmp_path / "o2")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "vgg-jax localize: error: a box net has no class scores: give --classifier WEIGHTS (a "
        "classification net of the same classes), whose scores rate the boxes as in the paper")
