"""Weight initialisation (Sec. 3.1): the schemes a VGG's conv and fc kernels are drawn
with, and fc kernels drawn in row blocks so VGG-16's fc6 never needs its 103M values
twice in memory."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vgg_jax.choices import BIAS_INITS, INIT_SCHEMES
from vgg_jax.errors import check_choice


def initializers(scheme: str) -> tuple[Callable, Callable]:
    """(conv kernel init, fc kernel init); biases are `bias_initializer`'s.

    paper         N(0, 0.01^2): std 0.01, the convention of AlexNet and Caffe's ImageNet
                  example, which the paper's "10^-2 variance" is read as here (the VGG
                  release has deploy prototxts only, without fillers); Sec. 3.1.
    paper_literal N(0, 1e-2): the paper's words read literally ("10^-2 variance"), std 0.1.
    glorot        Glorot & Bengio (2010) uniform, which the authors later found trains D/E
                  without pre-initialisation.
    kaiming       torchvision: He normal (fan_out, ReLU gain) for convs, N(0, 0.01) for fc.
    he            He et al. (2015) normal, fan_in, ReLU gain (std sqrt(2 / fan_in)) for
                  every kernel, fc included: the variance of the signal kept through each
                  ReLU layer (PyTorch's kaiming_normal_(mode='fan_in'), Keras' he_normal
                  untruncated).
    """
    check_choice("init scheme", scheme, INIT_SCHEMES)
    if scheme == "paper":
        return nn.initializers.normal(0.01), fc_initializer(std=0.01)
    if scheme == "paper_literal":
        return nn.initializers.normal(0.1), fc_initializer(std=0.1)
    if scheme == "glorot":
        return nn.initializers.xavier_uniform(), fc_initializer(glorot=True)
    if scheme == "kaiming":
        he = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        return he, fc_initializer(std=0.01)
    if scheme == "he":
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal"), fc_initializer(he=True)
    raise AssertionError(scheme)  # every INIT_SCHEMES entry is handled above


def bias_initializer(scheme: str, fan_in: int) -> Callable:
    """A layer's bias init, `fan_in` = its inputs per output (k*k*Cin for a conv).

    zeros  the paper's ("The biases were initialised with zero", Sec. 3.1), torchvision's
           and Keras'.
    torch  PyTorch's own default for nn.Conv2d and nn.Linear, which code that re-draws
           only the weights keeps (d2l's `train_ch6` applies xavier_uniform_ to the weights
           alone): uniform on [-1/sqrt(fan_in), +1/sqrt(fan_in)]. For a first conv of one
           channel that is +-1/3, the size of its [0, 1] inputs' contribution.
    """
    check_choice("bias init", scheme, BIAS_INITS)
    if scheme == "zeros":
        return nn.initializers.zeros
    bound = 1.0 / float(np.sqrt(fan_in))
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                    -bound, bound)


FC_INIT_BLOCK_ROWS = 2048


def fc_initializer(std: float | None = None, glorot: bool = False, he: bool = False) -> Callable:
    """An (in, out) FC kernel initializer: N(0, std^2), Glorot uniform on
    [-sqrt(6 / (in + out)), +sqrt(6 / (in + out))] (flax's xavier_uniform), or (he) He
    normal N(0, 2 / in), drawn in blocks of at most FC_INIT_BLOCK_ROWS rows. Same
    distribution; but fc6's 103M values no longer need the RNG's full-size temporaries
    at once (they put init's peak memory at ~4x the kernel, above a whole inference
    run's)."""
    def init(key, shape, dtype=jnp.float32):
        rows, cols = shape
        if glorot:
            limit = float(np.sqrt(6.0 / (rows + cols)))
            draw = lambda k, s: jax.random.uniform(k, s, dtype, -limit, limit)
        else:
            scale = float(np.sqrt(2.0 / rows)) if he else std
            draw = lambda k, s: scale * jax.random.normal(k, s, dtype)
        # rows split into equal blocks (25088 = 14 x 1792), so the result is a free
        # reshape of the stacked blocks, not a copy
        block = max(d for d in range(1, min(rows, FC_INIT_BLOCK_ROWS) + 1) if rows % d == 0)
        if block == rows or block < FC_INIT_BLOCK_ROWS // 8:
            return draw(key, shape)
        blocks = jax.lax.map(lambda k: draw(k, (block, cols)),
                             jax.random.split(key, rows // block))
        return blocks.reshape(rows, cols)
    return init
