"""The array operations of the VGG layers that Flax has no module for: AlexNet's LRN,
VGG's 2x2 max-pool (floor or Caffe's ceil mode), torchvision's adaptive average pool (as
matrices), and the masking of zero-padded regions in dense evaluation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def local_response_norm(x, size=5, k=2.0, alpha=1e-4, beta=0.75):
    """AlexNet's LRN across channels: b = a / (k + alpha * sum_{n neighbours} a^2)^beta.
    No 1/n on alpha (torch's nn.LocalResponseNorm has one: its equivalent is alpha*n)."""
    sq = jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
    half = size // 2
    window_sum = jax.lax.reduce_window(
        sq, 0.0, jax.lax.add, (1, 1, 1, size), (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
    return (x / jnp.power(k + alpha * window_sum, beta).astype(x.dtype)).astype(x.dtype)


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """torch's AdaptiveAvgPool bins: output i averages [floor(i*n/m), ceil((i+1)*n/m))."""
    p = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        p[i, lo:hi] = 1.0 / (hi - lo)
    return p


def max_pool(x, ceil: bool = False):
    """VGG's 2x2 stride-2 max pool (odd sizes floor, as torch's MaxPool2d(2, 2)), as a
    reshape and a max: the same values as nn.max_pool, and on XLA:CPU its backward is an
    elementwise select instead of a select-and-scatter over argmax indices (~7x faster
    for pool1 at batch 128). Ties share the gradient (a 2x2 window of ReLU zeros gets
    none either way: ReLU's gradient at 0 is 0)."""
    n, h, w, c = x.shape
    if ceil and (h % 2 or w % 2):  # Caffe's ceil mode: a last window over the odd row
        # zero padding is Caffe's -inf padding here: the pools follow ReLU, inputs are >= 0
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = h + h % 2, w + w % 2
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def avg_pool(x):
    """A 2x2 stride-2 average pool (odd sizes floor, as torch's AvgPool2d(2, 2)): the
    pool Gatys et al. (2016) put in place of VGG's max-pools for style transfer."""
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def adaptive_avg_pool(x, size: int):
    """torchvision's AdaptiveAvgPool2d(size) in NHWC; the identity when already size x size."""
    _, h, w, _ = x.shape
    if (h, w) == (size, size):
        return x
    ph = jnp.asarray(adaptive_pool_matrix(h, size), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(w, size), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x)


def mask_valid(x, valid):
    """x (N, H, W, C) with everything outside each image's valid (h, w) corner set to 0."""
    rows = jnp.arange(x.shape[1])[None, :, None] < valid[:, 0, None, None]
    cols = jnp.arange(x.shape[2])[None, None, :] < valid[:, 1, None, None]
    return x * (rows & cols)[..., None].astype(x.dtype)
