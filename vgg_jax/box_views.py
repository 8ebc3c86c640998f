"""Boxes through the image pipeline: where an object's box lands in the training view
(`preprocess.train_decode` + `train_view`) and in the test view (`preprocess.eval_view`)
of its image, for the localisation net of Appendix A, which is trained "as classification"
(the same rescaling, crops and flips) on its boxes.

Every random choice of the views is a stateless draw from the example's seed, so the box
follows the same draws: the scale S, the crop's offset (`preprocess.crop_offset`, the one
tf.image.stateless_random_crop takes) or the JPEG window, and the flip. Boxes are corner
fractions (x0, y0, x1, y1) of the image, as vgg_jax.boxes uses them, in TensorFlow ops
for tf.data; a box that leaves the crop keeps its part inside (zero width or height when
nothing is inside).
"""
from __future__ import annotations

import tensorflow as tf

from vgg_jax import preprocess as P


def _in_window(boxes, height, width, top, left, crop_h, crop_w):
    """Corner fractions of a (height, width) image -> corner fractions of the window
    (top, left, crop_h, crop_w) in its pixels, clipped to it."""
    f = lambda v: tf.cast(v, tf.float32)
    px = boxes * tf.stack([f(width), f(height), f(width), f(height)])
    out = (px - tf.stack([f(left), f(top), f(left), f(top)])) / tf.stack(
        [f(crop_w), f(crop_h), f(crop_w), f(crop_h)])
    return tf.clip_by_value(out, 0.0, 1.0)


def _flip(boxes):
    return tf.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)


def train_boxes(boxes, height, width, fused, seed, d):
    """`boxes` (M, 4) of a (height, width) image -> the same objects' boxes in its training
    view; `fused` is train_decode's flag (the JPEG window was decoded), `seed` and `d`
    (config.data) the view's own."""
    boxes = tf.cast(boxes, tf.float32)
    s_scale, s_crop, s_flip, _ = P.seeds(seed, 4)
    size = d.image_size
    if d.recipe == "paper":
        s = P.sample_scale(s_scale, d.s_min, d.s_max)

        def crop():
            nh, nw = P.rescaled_size(height, width, s)
            top, left = P.crop_offset(nh, nw, size, s_crop)
            return _in_window(boxes, nh, nw, top, left, size, size)

        def window():
            y, x, ch, cw = tf.unstack(P.jpeg_window(height, width, s, size, s_crop))
            return _in_window(boxes, height, width, y, x, ch, cw)

        boxes = tf.cond(fused, window, crop) if d.fused_jpeg_crop else crop()
    elif d.pad:  # 'small': resized to size x size (fractions stay), then pad-and-crop
        big = size + 2 * d.pad
        top, left = P.crop_offset(big, big, size, s_crop)
        boxes = _in_window(boxes, size, size, top - d.pad, left - d.pad, size, size)
    if d.flip:
        boxes = tf.cond(P.flipped(s_flip), lambda: _flip(boxes), lambda: boxes)
    return boxes


def eval_boxes(boxes, height, width, d, *, scale: int | None = None, crop: bool = True):
    """`boxes` (M, 4) of a (height, width) image -> the same objects' boxes in its test view
    (rescaled so the smallest side is Q, then the centre crop unless crop=False)."""
    boxes = tf.cast(boxes, tf.float32)
    if not crop:
        return boxes  # the whole rescaled image: fractions stay
    nh, nw = P.rescaled_size(height, width, tf.cast(scale or P.test_scale(d), tf.int32))
    size = d.image_size
    return _in_window(boxes, nh, nw, P.center_offset(nh, size), P.center_offset(nw, size),
                      size, size)
