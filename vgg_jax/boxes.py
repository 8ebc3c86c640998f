"""Bounding boxes for the paper's localisation task (Sec. 4.x and Appendix A).

The localisation net predicts a box as (centre x, centre y, width, height), each a
fraction of the image it saw (Appendix A: "a bounding box is represented by a 4-D vector
storing its center coordinates, width, and height"); the paper's measure counts a box as
correct when its intersection over union with a ground-truth box of the class exceeds 0.5.
Boxes here are float arrays (..., 4): `centred` (cx, cy, w, h) for what nets predict and
train on, `corners` (x0, y0, x1, y1) for overlaps, drawing and the transforms that follow an
image through the paper's rescale, crop and flip. numpy in, numpy out; `iou` and the
conversions work on jax arrays too.
"""
from __future__ import annotations

import numpy as np

IOU_CORRECT = 0.5  # Appendix A: correct when IoU > 0.5 with a ground-truth box of the class


def _xp(*arrays):
    """numpy for numpy inputs, jax.numpy for anything else (traced values included)."""
    if all(isinstance(a, (np.ndarray, list, tuple)) for a in arrays):
        return np
    import jax.numpy as jnp
    return jnp


def corners(centred):
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    xp = _xp(centred)
    cx, cy, w, h = (xp.asarray(centred)[..., i] for i in range(4))
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def centred(corner_boxes):
    """(x0, y0, x1, y1) -> (cx, cy, w, h)."""
    xp = _xp(corner_boxes)
    x0, y0, x1, y1 = (xp.asarray(corner_boxes)[..., i] for i in range(4))
    return xp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def ordered(corner_boxes):
    """Corner boxes with x0 <= x1 and y0 <= y1 (a net can predict a negative width or
    height; drawn and reported, such a box is the one between its corners)."""
    b = np.asarray(corner_boxes)
    return np.concatenate([np.minimum(b[..., :2], b[..., 2:]), np.maximum(b[..., :2], b[..., 2:])],
                          axis=-1)


def iou(a, b):
    """Intersection over union of corner boxes, broadcast over the leading axes; 0 where
    both are empty."""
    xp = _xp(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    iw = xp.clip(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = xp.clip(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda c: xp.clip(c[..., 2] - c[..., 0], 0, None) * xp.clip(c[..., 3] - c[..., 1], 0, None)
    union = area(a) + area(b) - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0.0)


# ------------------------------------------------------------------ following the image

def to_window(corner_boxes, window):
    """Corner boxes in pixels -> fractions of `window` (y, x, h, w in the same pixels: a
    crop of the image, or the whole image; a rescale moves no fraction), clipped to it. A box that leaves the window keeps
    the part inside (zero width or height when none is)."""
    y, x, h, w = (float(v) for v in window)
    b = np.asarray(corner_boxes, np.float64)
    b = np.stack([(b[..., 0] - x) / w, (b[..., 1] - y) / h,
                  (b[..., 2] - x) / w, (b[..., 3] - y) / h], axis=-1)
    return np.clip(b, 0.0, 1.0)


def to_pixels(corner_boxes, height, width):
    """Fractions of a (height, width) image -> pixels."""
    b = np.asarray(corner_boxes, np.float64)
    return b * np.array([width, height, width, height], np.float64)


def flip(corner_boxes):
    """The boxes of the left-right mirrored image (fractions)."""
    b = np.asarray(corner_boxes)
    return np.stack([1 - b[..., 2], b[..., 1], 1 - b[..., 0], b[..., 3]], axis=-1)


# ------------------------------------------------------------- merging dense predictions

def merge(boxes, scores, threshold: float = 0.5):
    """Greedy merging of dense box predictions (the paper's dense protocol, after Sermanet
    et al. 2014, OverFeat Sec. 4.3): repeatedly take the two most overlapping boxes and,
    while their IoU exceeds `threshold`, replace them by one box whose coordinates average
    all the predictions merged into it and whose score is the sum of their scores. Returns
    (corner boxes (M, 4), scores (M,)) best first.

    `boxes` (K, 4) corner boxes, `scores` (K,) the classification net's score of the class
    at each prediction's position."""
    boxes = [np.asarray(b, np.float64) for b in np.asarray(boxes, np.float64).reshape(-1, 4)]
    scores = [float(s) for s in np.asarray(scores, np.float64).reshape(-1)]
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    total = [b.copy() for b in boxes]  # sums of member coordinates
    count = [1] * len(boxes)
    while len(boxes) > 1:
        b = np.stack(boxes)
        overlap = iou(b[:, None], b[None])
        np.fill_diagonal(overlap, -1.0)
        i, j = np.unravel_index(np.argmax(overlap), overlap.shape)
        if overlap[i, j] <= threshold:
            break
        i, j = min(i, j), max(i, j)
        total[i], count[i] = total[i] + total[j], count[i] + count[j]
        boxes[i], scores[i] = total[i] / count[i], scores[i] + scores[j]
        for lst in (boxes, scores, total, count):
            del lst[j]
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.stack(boxes)[order].reshape(-1, 4), np.asarray(scores)[order]


# ------------------------------------------------------------------------- the measure

def guesses_correct(guess_classes, guess_boxes, true_classes, true_boxes,
                    threshold: float = IOU_CORRECT):
    """For one image: whether each (class, corner box) guess is right (ILSVRC's
    localisation rule: the class is one of the image's and the box overlaps one of that
    class's ground-truth boxes by IoU > threshold). `true_boxes` (T, 4) with `true_classes`
    (T,). Returns a bool array (G,)."""
    guess_boxes = np.asarray(guess_boxes, np.float64).reshape(-1, 4)
    true_boxes = np.asarray(true_boxes, np.float64).reshape(-1, 4)
    same = np.asarray(guess_classes).reshape(-1, 1) == np.asarray(true_classes).reshape(1, -1)
    return (same & (iou(guess_boxes[:, None], true_boxes[None]) > threshold)).any(axis=1)


def localisation_error(correct, k: int = 5) -> float:
    """Top-k localisation error over images: `correct` (N, G) booleans of each image's
    guesses, best first; an image counts when one of its first k guesses is right."""
    correct = np.asarray(correct, bool)
    return float(1.0 - correct[:, :k].any(axis=1).mean())
