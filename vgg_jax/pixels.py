"""What the device does to the uint8 pixels the host sends (issue: uint8 to the device).

The input pipeline stops at uint8 HWC crops (decode, rescale, crop, flip: the work that
needs the encoded image) plus, for training, the three random PCA alphas of each image.
The rest of Sec. 3.1's preprocessing runs inside the jitted steps: Krizhevsky et al.'s
colour shift sum_i alpha_i lambda_i p_i, the mean subtraction (and std division for
torchvision's convention), RGB->BGR for Caffe weights; the model then casts to its
compute dtype. The host sends 150 KB per 224x224 image instead of 602 KB of float32, and
spends no core-time on float arithmetic. `Pixels` is a frozen dataclass, so it can close
over a jitted function as a constant.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vgg_jax import preprocess


@dataclasses.dataclass(frozen=True)
class Pixels:
    mean: tuple
    std: tuple
    bgr: bool = False
    eigval: tuple = preprocess.IMAGENET_EIGVAL
    eigvec: tuple = preprocess.IMAGENET_EIGVEC  # columns are the eigenvectors

    def __call__(self, images, alpha=None):
        """(N, H, W, C) uint8 (or float 0..255) pixels -> normalised float32; `alpha`
        (N, 3): the colour shift's random coefficients (alpha_i ~ N(0, sigma^2))."""
        x = jnp.asarray(images).astype(jnp.float32)
        if alpha is not None and x.shape[-1] == 3:
            lam = jnp.asarray(self.eigval, jnp.float32)
            shift = 255.0 * (alpha * lam) @ jnp.asarray(self.eigvec, jnp.float32).T  # (N, 3)
            x = x + shift[:, None, None, :]
        x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        return x[..., ::-1] if self.bgr else x


def for_data(d) -> Pixels:
    """The Pixels of config.data (or of a weights directory's `weights.data_config`)."""
    norm = preprocess.normalization(d.normalization, d.get("mean"), d.get("std"),
                                    d.get("bgr", False))
    as_tuple = lambda v: tuple(tuple(float(x) for x in r) if isinstance(r, (list, tuple))
                               else float(r) for r in v)
    return Pixels(tuple(norm["mean"]), tuple(norm["std"]), bool(norm["bgr"]),
                  as_tuple(d.get("pca_eigval", preprocess.IMAGENET_EIGVAL)),
                  as_tuple(d.get("pca_eigvec", preprocess.IMAGENET_EIGVEC)))
