"""Inference on image files with a weights directory: top-k classes and named features.

The preprocessing comes from the weights' meta.json (torchvision's resize 256 / centre
crop 224 / mean-std for converted torchvision weights; the training config's for our own),
so the user never guesses it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from vgg_jax import checkpoint, classes, conv, pixels, preprocess


def data_config(meta: dict) -> ml_collections.ConfigDict:
    """The eval-time fields of config.data, rebuilt from a weights directory's meta."""
    p = meta["preprocessing"]
    return ml_collections.ConfigDict(dict(
        normalization="custom", mean=tuple(p["mean"]), std=tuple(p["std"]), bgr=p["bgr"],
        recipe=p["recipe"], image_size=p["image_size"], eval_scale=p["eval_scale"],
        channels=p["channels"]))


def read_image_bytes(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tf.io.decode_image(raw, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"cannot decode image {path}: {e.message.splitlines()[0]}") from None
    return raw


class Predictor:
    """A loaded model and its preprocessing; jit-compiled once per input shape."""

    def __init__(self, weights: str):
        self.variables, self.meta = checkpoint.load_weights(weights)
        self.model = checkpoint.model_from_meta(self.meta)
        self.d = data_config(self.meta)
        self.class_names = self.meta.get("class_names") or [
            str(i) for i in range(self.model.num_classes)]
        self.display_names = classes.display_names(self.meta, self.model.num_classes)
        self.normalise = pixels.for_data(self.d)
        self._normalise = jax.jit(self.normalise)
        apply = lambda v, x, **kw: self.model.apply(v, self.normalise(x), **kw)
        self._apply = conv.jit_eval(apply,
                                      static_argnames=("train", "dense", "capture", "mutable"))

    def pixels(self, path: str, *, scale=None, crop=True) -> np.ndarray:
        """The uint8 pixels the device gets for an image file (decoded, rescaled, cropped)."""
        raw = read_image_bytes(path)
        return preprocess.eval_example(tf.constant(raw), self.d, scale=scale, crop=crop).numpy()

    def image(self, path: str, *, scale=None, crop=True) -> np.ndarray:
        """The normalised float image the network sees (for saliency, activations)."""
        return np.asarray(self._normalise(self.pixels(path, scale=scale, crop=crop)[None])[0])

    def logits(self, images: np.ndarray, dense: bool = False):
        """Logits of uint8 images (as `pixels` gives), normalised on the device."""
        return self._apply(self.variables, jnp.asarray(images), train=False, dense=dense)

    def probabilities(self, path: str, *, dense: bool = False, q: int = 256) -> np.ndarray:
        if dense:  # Sec. 3.2: score map over the whole image at scale Q, averaged spatially
            scores = self.logits(self.pixels(path, scale=q, crop=False)[None], dense=True)
            return np.asarray(jax.nn.softmax(scores.mean(axis=(1, 2)))[0])
        return np.asarray(jax.nn.softmax(self.logits(self.pixels(path)[None]))[0])

    def top(self, path: str, k: int = 5, **kw) -> list[tuple[str, float]]:
        p = self.probabilities(path, **kw)
        order = np.argsort(-p)[:k]
        return [(self.display_names[i], float(p[i])) for i in order]

    def features(self, paths, layer: str) -> np.ndarray:
        images = np.stack([self.pixels(p) for p in paths])
        _, state = self._apply(self.variables, jnp.asarray(images), train=False,
                               capture=(layer,), mutable=("intermediates",))
        return np.asarray(state["intermediates"]["layers"][0][layer])


def main_predict(args) -> None:
    pred = Predictor(args.weights)
    for path in args.images:
        print(path)
        for name, p in pred.top(path, args.top, dense=args.dense, q=args.q):
            print(f"  {p:8.4f}  {name}")


def main_features(args) -> None:
    pred = Predictor(args.weights)
    feats = pred.features(args.images, args.layer)
    np.save(args.out, feats)
    print(f"wrote {args.layer} features {feats.shape} to {args.out}")
