"""What a training step minimises and what validation counts, per kind of net: class
scores (soft-max cross-entropy, top-k correct) or the localisation net of Appendix A
(a Euclidean loss on the box, correct when IoU > 0.5).

An objective is `loss(outputs, target)` per example and `correct(outputs, target, k)`
per example (0/1); `target` is a batch's 'label' for a classifier and its
{'label', 'boxes'} for a box net (boxes (N, M, 4) corner fractions of the view, padded
with empty boxes). Pure jnp: they run inside the jitted steps.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vgg_jax import boxes as B


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct_topk(logits, labels, k: int):
    k = min(k, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def predicted_box(outputs, labels):
    """The box a box net gives for each example's class: (N, 4) centred, of (N, K, 4)
    outputs (K = 1: SCR's one box; K = classes: PCR's box of `labels`)."""
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    return jnp.take_along_axis(outputs, labels[:, None, None], axis=1)[:, 0]


def box_loss(outputs, target):
    """The paper's Euclidean loss, 1/2 |prediction - ground truth|^2 over (cx, cy, w, h),
    against the example's first ground-truth box (Caffe's EuclideanLoss per example)."""
    want = B.centred(target["boxes"][:, 0])
    return 0.5 * jnp.sum((predicted_box(outputs, target["label"]) - want) ** 2, axis=-1)


def box_correct(outputs, target, k: int = 1):
    """1 where the predicted box of the true class overlaps one of the image's
    ground-truth boxes with IoU > 0.5 (the paper's centre-crop protocol, which gives the
    class: top-1 and top-k are the same count)."""
    del k
    guess = B.corners(predicted_box(outputs, target["label"]))
    overlap = B.iou(guess[:, None], target["boxes"])  # (N, M); padding boxes are empty: 0
    return jnp.any(overlap > B.IOU_CORRECT, axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable
    correct: Callable
    keys: tuple  # the batch entries that make the target

    def target(self, batch):
        return batch["label"] if self.keys == ("label",) else {k: batch[k] for k in self.keys}


CLASSES = Objective("classification", cross_entropy, correct_topk, ("label",))
BOXES = Objective("localisation", box_loss, box_correct, ("label", "boxes"))


def of(model) -> Objective:
    """The objective of a model (models.VGG): BOXES for a box head, else CLASSES."""
    return BOXES if getattr(model, "box_head", "") else CLASSES
