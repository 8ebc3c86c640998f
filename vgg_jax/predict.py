"""Inference on image files with a weights directory: top-k classes and named features.

The preprocessing comes from the weights' meta.json (torchvision's resize 256 / centre
crop 224 / mean-std for converted torchvision weights; the training config's for our own),
so the user never guesses it. The loaded net is `weights.Net`.
"""
from __future__ import annotations

import numpy as np

from vgg_jax.weights import Net, read_image_bytes


def predict(*, weights: str, images, top: int = 5, dense: bool = False, q: int = 256) -> None:
    """Print the `top` classes of each image file: the centre crop, or with `dense` the
    whole image at scale `q` through the fully-convolutional net (without the flip that
    the paper's dense evaluation averages in: `vgg-jax evaluate --protocol dense`)."""
    net = Net(weights).require_classifier()
    for path in images:  # every file checked before any output
        read_image_bytes(path)
    for path in images:
        print(path)
        for name, p in net.top(path, top, dense=dense, q=q):
            print(f"  {p:8.4f}  {name}")


def features(*, weights: str, images, layer: str, out: str) -> None:
    """Save `layer`'s activations of the image files' centre crops to `out` (.npy)."""
    feats = Net(weights).features(images, layer)
    np.save(out, feats)
    print(f"wrote {layer} features {feats.shape} to {out}")
