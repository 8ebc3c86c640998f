"""vgg_jax.boxes: the box arithmetic of the paper's localisation task (Appendix A), on
hand-made boxes whose answers are worked out here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import boxes


def test_centred_and_corners_are_inverse_and_match_a_worked_box():
    c = np.array([[0.5, 0.25, 0.2, 0.1]])
    np.testing.assert_allclose(boxes.corners(c), [[0.4, 0.2, 0.6, 0.3]])
    np.testing.assert_allclose(boxes.centred(boxes.corners(c)), c)
    # traced values too (a loss inside jit)
    np.testing.assert_allclose(jax.jit(boxes.corners)(jnp.asarray(c)), [[0.4, 0.2, 0.6, 0.3]],
                               rtol=1e-6)


def test_iou_of_worked_pairs():
    a = np.array([0.0, 0.0, 2.0, 2.0])
    # half overlapping: intersection 2, union 6
    assert boxes.iou(a, np.array([1.0, 0.0, 3.0, 2.0])) == pytest.approx(2 / 6)
    assert boxes.iou(a, a) == 1.0
    assert boxes.iou(a, np.array([2.0, 2.0, 3.0, 3.0])) == 0.0  # touching corners
    assert boxes.iou(a, np.array([0.5, 0.5, 1.5, 1.5])) == pytest.approx(1 / 4)  # inside
    assert boxes.iou(np.zeros(4), np.zeros(4)) == 0.0  # two empty boxes: 0, not NaN
    # broadcast: (2, 1, 4) x (1, 3, 4) -> (2, 3)
    many = boxes.iou(np.stack([a, a + 1])[:, None], np.stack([a, a + 1, a + 5])[None])
    np.testing.assert_allclose(many, [[1, 1 / 7, 0], [1 / 7, 1, 0]])
    # jax: the same numbers, and a finite gradient where the boxes do not overlap
    j = boxes.iou(jnp.asarray(a), jnp.asarray([1.0, 0.0, 3.0, 2.0]))
    assert float(j) == pytest.approx(2 / 6)
    g = jax.grad(lambda b: boxes.iou(jnp.asarray(a), b))(jnp.asarray([5.0, 5.0, 6.0, 6.0]))
    assert np.isfinite(np.asarray(g)).all()


def test_a_box_follows_crops_and_flips():
    # a 100 (h) x 200 (w) image, an object at x 50..90, y 20..60
    obj = np.array([50.0, 20.0, 90.0, 60.0])
    whole = boxes.to_window(obj, (0, 0, 100, 200))
    np.testing.assert_allclose(whole, [0.25, 0.2, 0.45, 0.6])
    # a 64x64 crop at (y, x) = (10, 40): the object at (10..50, 10..50) of 64
    np.testing.assert_allclose(boxes.to_window(obj, (10, 40, 64, 64)),
                               np.array([10, 10, 50, 50]) / 64)
    # a crop that cuts the object keeps the part inside
    np.testing.assert_allclose(boxes.to_window(obj, (0, 70, 100, 100)), [0, 0.2, 0.2, 0.6])
    # mirrored: x -> 1 - x, the corners swap
    np.testing.assert_allclose(boxes.flip(whole), [0.55, 0.2, 0.75, 0.6])
    np.testing.assert_allclose(boxes.flip(boxes.flip(whole)), whole)
    np.testing.assert_allclose(boxes.to_pixels(whole, 100, 200), obj)


def test_merge_joins_overlapping_boxes_by_averaging_and_sums_their_scores():
    # three predictions around one object, one apart: two boxes come out
    b = np.array([[0.10, 0.10, 0.50, 0.50],
                  [0.12, 0.10, 0.52, 0.50],
                  [0.10, 0.14, 0.50, 0.54],
                  [0.70, 0.70, 0.90, 0.90]])
    s = np.array([0.2, 0.3, 0.1, 0.5])
    merged, scores = boxes.merge(b, s, threshold=0.5)
    assert merged.shape == (2, 4)
    # the first three merged: their mean, their summed score 0.6 (> 0.5: first)
    np.testing.assert_allclose(merged[0], b[:3].mean(axis=0))
    np.testing.assert_allclose(scores, [0.6, 0.5])
    np.testing.assert_allclose(merged[1], b[3])
    # a stricter threshold keeps them apart, best score first
    merged, scores = boxes.merge(b, s, threshold=0.95)
    assert merged.shape == (4, 4)
    np.testing.assert_allclose(scores, [0.5, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(merged[0], b[3])
    one, score = boxes.merge(b[:1], s[:1])
    np.testing.assert_allclose(one, b[:1]) and np.testing.assert_allclose(score, s[:1])
    with pytest.raises(ValueError, match="4 boxes but 3 scores"):
        boxes.merge(b, s[:3])


def test_top5_localisation_error_needs_the_class_and_an_overlap_above_one_half():
    truth = np.array([[0.1, 0.1, 0.5, 0.5]])
    near = [0.12, 0.1, 0.52, 0.5]  # IoU 0.905
    far = [0.6, 0.6, 0.9, 0.9]
    half = [0.1, 0.1, 0.5, 0.3]  # IoU exactly 0.5: not correct (> 0.5 is the rule)
    assert boxes.iou(np.array(half), truth[0]) == pytest.approx(0.5)
    right = boxes.guesses_correct([3, 7], [far, near], [7], truth)
    np.testing.assert_array_equal(right, [False, True])
    wrong_class = boxes.guesses_correct([3], [near], [7], truth)
    np.testing.assert_array_equal(wrong_class, [False])
    np.testing.assert_array_equal(boxes.guesses_correct([7], [half], [7], truth), [False])
    # two images, six guesses each: the first right at guess 5, the second at guess 6
    correct = np.zeros((2, 6), bool)
    correct[0, 4] = correct[1, 5] = True
    assert boxes.localisation_error(correct, k=5) == 0.5
    assert boxes.localisation_error(correct, k=1) == 1.0
    assert boxes.localisation_error(correct, k=6) == 0.0


@pytest.mark.parametrize("head,k", [("scr", 1), ("pcr", 5)])
def test_box_heads_predict_one_box_or_one_per_class_standard_and_dense(head, k):
    from vgg_jax import models, weights
    model = models.create_model("A", num_classes=5, width=1 / 16, fc_widths=(8, 8),
                                classifier_pool=1, box_head=head, conv_impl="xla")
    v = models.init_variables(model, jax.random.PRNGKey(0), 32)
    assert v["params"]["fc8"]["kernel"].shape == (8, 4 * k)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    out = model.apply(v, x)
    assert out.shape == (2, k, 4)
    # fc8 as the same numbers: box j of class c is fc8's outputs 4c..4c+3
    fc7 = models.extract(model, v, x, ["fc7"])["fc7"]
    flat = fc7 @ v["params"]["fc8"]["kernel"] + v["params"]["fc8"]["bias"]
    np.testing.assert_allclose(out, flat.reshape(2, k, 4), rtol=1e-5, atol=1e-6)
    dense = model.apply(v, np.zeros((1, 64, 96, 3), np.float32), dense=True)
    assert dense.shape == (1, 2, 3, k, 4)  # a box per position of the 2x3 output map
    # the head travels in meta.json: a weights directory rebuilds the same module
    meta = weights.model_meta(model, _data_config(), [f"c{i}" for i in range(5)])
    assert meta["model"]["box_head"] == head
    assert weights.model_from_meta(meta, conv_impl="xla") == model


def test_a_box_head_is_checked_in_one_line():
    from vgg_jax import models
    from vgg_jax.errors import UserError
    with pytest.raises(UserError, match="box_head='box': valid are '' .*'scr'.*'pcr'"):
        models.create_model("A", box_head="box")
    with pytest.raises(UserError, match="needs the fully-connected layers"):
        models.create_model("A", box_head="scr", include_top=False)


def _data_config():
    from conftest import load_config
    return load_config().data


def _drawn(h, w, box_px):
    """An h x w black image with a white rectangle (x0, y0, x1, y1 pixels)."""
    image = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box_px
    image[y0:y1, x0:x1] = 255
    return image


def _ink_box(view):
    """Corner fractions of the pixels above half brightness in a view (None if none)."""
    rows, cols = np.nonzero(np.asarray(view)[..., 0] > 127)
    if not len(rows):
        return None
    n = view.shape[0]
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / n


@pytest.mark.parametrize("recipe", ["paper", "paper-jpeg", "small"])
def test_a_box_drawn_into_an_image_stays_on_the_object_in_training_and_test_views(recipe):
    """The training view (scale, crop or JPEG window, flip, each drawn from the example's
    seed) and the test view (rescale, centre crop) move the box exactly as they move the
    object: the box box_views computes is the drawn rectangle's box in the view, to the
    pixel the resampling blurs, over 40 seeds."""
    import ml_collections
    import tensorflow as tf
    from vgg_jax import box_views, preprocess
    h, w, obj = 90, 130, (40, 20, 85, 70)
    image = _drawn(h, w, obj)
    fractions = tf.constant([[obj[0] / w, obj[1] / h, obj[2] / w, obj[3] / h]], tf.float32)
    d = ml_collections.ConfigDict(dict(
        recipe="small" if recipe == "small" else "paper", image_size=48, s_min=56, s_max=96,
        fused_jpeg_crop=recipe == "paper-jpeg", pad=6, flip=True, channels=3,
        colour_pca=False, pca_std=0.1, eval_scale=64, antialias=False))
    raw = tf.io.encode_jpeg(image, quality=100) if recipe == "paper-jpeg" else \
        tf.io.encode_png(image)
    flips = 0
    for i in range(40):
        seed = tf.constant([7, i], tf.int64)
        decoded, fused = preprocess.train_decode(raw, seed, d)
        view, _ = preprocess.train_view(decoded, fused, seed, d)
        got = box_views.train_boxes(fractions, h, w, fused, seed, d).numpy()[0]
        want = _ink_box(view)
        if want is None:  # cropped away: the box has no area left
            assert (got[2] - got[0]) * (got[3] - got[1]) < 1e-6
            continue
        np.testing.assert_allclose(got, want, atol=1.5 / 48)
        flips += bool(preprocess.flipped(preprocess.seeds(seed, 4)[2]))
    assert 5 < flips < 35  # both ways were seen
    view = preprocess.eval_view(preprocess.eval_decode(raw, d), d)
    got = box_views.eval_boxes(fractions, h, w, d).numpy()[0]
    np.testing.assert_allclose(got, _ink_box(view), atol=1.5 / 48)


def test_the_canvas_dataset_prepares_offline_with_tight_boxes_no_constant_box_finds(tmp_path):
    """vgg_digits_canvas through TFDS: every box is the tight box of its digit's ink, and
    the best constant box (the training boxes' mean, or any square on a grid) is correct on
    at most 30% of the test images, so a net must find the digit to pass."""
    import tensorflow_datasets as tfds
    from vgg_jax import prepared
    from vgg_jax.datasets import canvas
    builder = prepared.tfds_builder("vgg_digits_canvas", str(tmp_path))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 1437,
                                                                         "test": 360}
    test = list(tfds.as_numpy(builder.as_dataset(split="test")))
    for ex in test[:50]:
        ymin, xmin, ymax, xmax = (ex["bboxes"][0] * canvas.CANVAS).round().astype(int)
        ink = ex["image"][..., 0] > canvas.INK
        assert ink[ymin:ymax, xmin:xmax].sum() == ink.sum()  # all the ink inside
        assert ink[ymin, xmin:xmax].any() and ink[ymax - 1, xmin:xmax].any()  # tight
        assert ink[ymin:ymax, xmin].any() and ink[ymin:ymax, xmax - 1].any()
    truth = np.stack([ex["bboxes"][0][[1, 0, 3, 2]] for ex in test])  # -> x0, y0, x1, y1
    train = list(tfds.as_numpy(builder.as_dataset(split="train")))
    mean = np.stack([ex["bboxes"][0][[1, 0, 3, 2]] for ex in train]).mean(axis=0)
    candidates = [mean] + [np.array([c - s / 2, c - s / 2, c + s / 2, c + s / 2])
                           for c in np.linspace(0.3, 0.7, 9) for s in np.linspace(0.2, 0.7, 11)]
    best = max(float((boxes.iou(np.broadcast_to(b, truth.shape), truth) > 0.5).mean())
               for b in candidates)
    assert best <= 0.30, best


def test_ordered_boxes_run_from_the_smaller_corner_to_the_larger():
    b = np.array([[0.6, 0.1, 0.2, 0.5], [0.1, 0.2, 0.3, 0.4]])  # the first: x1 < x0
    np.testing.assert_array_equal(boxes.ordered(b), [[0.2, 0.1, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4]])
