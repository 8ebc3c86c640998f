"""Image-specific class saliency (Simonyan, Vedaldi & Zisserman 2013, "Deep Inside
Convolutional Networks", Sec. 3.1): the gradient w of the class score S_c (the logit,
before the soft-max) with respect to the input image I at I, and the map
M_ij = max_c |w_ij,c| over colour channels.

The input is the preprocessed image the network sees (mean-subtracted, as in the paper).
`position=(i, j)` takes S_c at one location of the dense class-score map (Sec. 3.2 of
the VGG paper) instead: only pixels inside that location's receptive field can move it,
so the map is exactly zero elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import conv, models


def _score_and_grad_fn(model, variables, image, class_index, position=None):
    """(S_c, c), dS_c/dI in one forward and backward; class_index < 0: the top class."""
    def score(x):
        if position is None:
            scores = model.apply(variables, x[None], train=False)[0]
        else:
            scores = model.apply(variables, x[None], train=False, dense=True)[0, position[0],
                                                                            position[1]]
        c = jnp.where(class_index < 0, jnp.argmax(jax.lax.stop_gradient(scores)), class_index)
        return scores[c], c
    (score_c, c), grad = jax.value_and_grad(score, has_aux=True)(image)
    return score_c, c, grad


_score_and_grad = conv.jit_eval(_score_and_grad_fn, static_argnames=("model", "position"))


def input_gradient(model, variables, image, class_index: int | None = None,
                   position: tuple[int, int] | None = None):
    """(dS_c/dI of shape image.shape, c, S_c). class_index None: the top class (of the
    whole image, or at `position`)."""
    models.check_input((1, *np.shape(image)), model.in_channels, dense=position is not None,
                       classifier_pool=model.classifier_pool, pool_ceil=model.pool_ceil)
    position = None if position is None else (int(position[0]), int(position[1]))
    image = jnp.asarray(image)
    if not jnp.issubdtype(image.dtype, jnp.floating):
        image = image.astype(jnp.float32)
    c = -1 if class_index is None else int(class_index)
    score, c, grad = _score_and_grad(model, variables, image, c, position)
    return np.asarray(grad), int(c), float(score)


def saliency_map(model, variables, image, class_index: int | None = None,
                 position: tuple[int, int] | None = None):
    """(M (H, W) = max over channels of |dS_c/dI|, c, S_c)."""
    grad, c, score = input_gradient(model, variables, image, class_index, position)
    return np.abs(grad).max(axis=-1), c, score
