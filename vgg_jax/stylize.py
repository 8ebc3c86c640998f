"""Neural style transfer as Gatys, Ecker & Bethge (2016) define it: an image optimised so
that its VGG features at one tap match the content image's and its Gram matrices at
several taps match the style image's (`vgg-jax stylize`).

Their choices are the defaults: VGG-19 with average pools, content at relu4_2, style at
relu1_1 ... relu5_1 with equal weights. The optimiser is optax's Adam on the pixels (they
used L-BFGS), started from the content image. The two terms are taken as mean squared
differences (of the features; of the Gram matrices, `perceptual.gram`), so that the
weights read as in PyTorch's neural-transfer tutorial (content 1, style 1e6).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models, perceptual, pixels
from vgg_jax.errors import UserError

CONTENT_TAP = "relu4_2"
STYLE_TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def losses_fn(model: models.VGG, variables, normalise: pixels.Pixels, content, style,
              content_tap: str = CONTENT_TAP, style_taps: Sequence[str] = STYLE_TAPS):
    """fn(image) -> (content term, style term): the mean squared difference of the
    features at `content_tap` from `content`'s, and the mean over `style_taps` of the mean
    squared difference of the Gram matrices from `style`'s. Images (H, W, 3) in [0, 1]."""
    taps = (content_tap, *style_taps)

    def features(image):
        return models.extract(model, variables, normalise(255.0 * image[None]), taps)

    target_content = features(content)[content_tap]
    style_feats = features(style)
    target_grams = {t: perceptual.gram(style_feats[t]) for t in style_taps}

    def fn(image):
        f = features(image)
        c = jnp.mean(jnp.square(f[content_tap] - target_content))
        s = sum(jnp.mean(jnp.square(perceptual.gram(f[t]) - target_grams[t]))
                for t in style_taps) / len(style_taps)
        return c, s
    return fn


def stylize(model: models.VGG, variables, normalise: pixels.Pixels, content, style, *,
            steps: int = 300, learning_rate: float = 0.02, content_weight: float = 1.0,
            style_weight: float = 1e6, tv_weight: float = 0.0,
            content_tap: str = CONTENT_TAP, style_taps: Sequence[str] = STYLE_TAPS,
            progress: bool = True):
    """(the stylised image (H, W, 3) in [0, 1], [(content term, style term) per step]).
    `content` and `style`: (H, W, 3) float arrays in [0, 1] of the same size."""
    import optax
    for tap in (content_tap, *style_taps):
        models.check_layer(model.arch, tap)
    terms = losses_fn(model, variables, normalise, jnp.asarray(content, jnp.float32),
                      jnp.asarray(style, jnp.float32), content_tap, tuple(style_taps))

    def loss(image):
        c, s = terms(image)
        tv = perceptual.total_variation(image[None])[0] / image.size
        return content_weight * c + style_weight * s + tv_weight * tv, (c, s)

    tx = optax.adam(learning_rate)

    @jax.jit
    def step(image, opt_state):
        (_, aux), g = jax.value_and_grad(loss, has_aux=True)(image)
        updates, opt_state = tx.update(g, opt_state, image)
        return jnp.clip(optax.apply_updates(image, updates), 0.0, 1.0), opt_state, aux

    image = jnp.asarray(content, jnp.float32)
    opt_state, history = tx.init(image), []
    from tqdm import tqdm
    with tqdm(total=steps, desc="stylize", unit="step", disable=not progress,
              dynamic_ncols=True) as bar:
        for _ in range(steps):
            image, opt_state, (c, s) = step(image, opt_state)
            history.append((float(c), float(s)))
            bar.update(1)
            bar.set_postfix(content=f"{history[-1][0]:.3g}", style=f"{history[-1][1]:.3g}")
    return np.asarray(image), history


def read_rgb(path: str, size: tuple[int, int] | int) -> np.ndarray:
    """An image file as (H, W, 3) float32 in [0, 1]: its longer side `size` (int), or
    exactly (width, height)."""
    from PIL import Image
    try:
        im = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    if isinstance(size, int):
        scale = size / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return np.asarray(im.resize(size, Image.BICUBIC), np.float32) / 255.0


def main(*, content: str, style: str, out: str, weights: str = "torchvision:vgg19",
         size: int = 256, steps: int = 300, learning_rate: float = 0.02,
         content_weight: float = 1.0, style_weight: float = 1e6, tv_weight: float = 0.0,
         content_tap: str = CONTENT_TAP, style_taps: Sequence[str] = STYLE_TAPS,
         max_pool: bool = False) -> dict:
    """`vgg-jax stylize CONTENT STYLE --out OUT.png`: writes the stylised image and, beside
    it, OUT_side_by_side.png (content, style, result)."""
    from PIL import Image

    from vgg_jax import weights as weights_lib
    for path in (content, style):
        if not os.path.isfile(path):
            raise UserError(f"image file {path} does not exist")
    variables, meta = weights_lib.load_weights(weights)
    model = weights_lib.model_from_meta(meta, include_top=False,
                                        pooling="max" if max_pool else "avg")
    normalise = pixels.for_data(weights_lib.data_config(meta))
    c = read_rgb(content, size)
    s = read_rgb(style, (c.shape[1], c.shape[0]))  # the style image at the content's size
    if min(c.shape[:2]) < models.MIN_SIZE:
        raise UserError(f"--size {size} makes the content image {c.shape[1]}x{c.shape[0]}: "
                        f"VGG needs at least {models.MIN_SIZE} pixels a side")
    result, history = stylize(model, {"params": variables["params"],
                                      **({"batch_stats": variables["batch_stats"]}
                                         if "batch_stats" in variables else {})},
                              normalise, c, s, steps=steps, learning_rate=learning_rate,
                              content_weight=content_weight, style_weight=style_weight,
                              tv_weight=tv_weight, content_tap=content_tap,
                              style_taps=tuple(style_taps))
    to_png = lambda a: Image.fromarray(np.round(255 * np.clip(a, 0, 1)).astype(np.uint8))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    to_png(result).save(out)
    side = os.path.splitext(out)[0] + "_side_by_side.png"
    to_png(np.concatenate([c, s, result], axis=1)).save(side)
    print(f"wrote {out} and {side}: content term {history[0][0]:.4g} -> {history[-1][0]:.4g}, "
          f"style term {history[0][1]:.4g} -> {history[-1][1]:.4g} after {steps} steps")
    return dict(first=history[0], last=history[-1], out=out, side_by_side=side)
