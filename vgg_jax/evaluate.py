"""The paper's test protocols (Sec. 3.2), over weights directories and a dataset split.

center          rescale to Q, centre crop (torchvision style).
dense           rescale the whole image to Q, run the fully-convolutional net, average the
                class score map spatially, soft-max; averaged with the flipped image.
multicrop       5x5 regular grid of crops x 2 flips = 50 crops per scale, soft-max averaged.
dense+multicrop both, averaged (the paper's best single-net result, Table 5).
Several scales Q and several nets (fusion, Table 6) average soft-max posteriors.

Images vary in size under dense evaluation, so evaluation runs one image at a time (jit
compiles once per distinct shape; all crops of one image form one batch).
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vgg_jax import checkpoint, input_pipeline, models, preprocess
from vgg_jax.predict import data_config

PROTOCOLS = ("center", "dense", "multicrop", "dense+multicrop")


def paper_scales(s: int | None = None, s_min: int | None = None, s_max: int | None = None):
    """Sec. 3.2 multi-scale test: Q = {S-32, S, S+32} for fixed S; {Smin, (Smin+Smax)/2,
    Smax} for S jittered in [Smin, Smax]."""
    if s is not None:
        return [s - 32, s, s + 32]
    return [s_min, (s_min + s_max) // 2, s_max]


def grid_offsets(length: int, crop: int, n: int = 5) -> list[int]:
    """n crop starts spread evenly from 0 to length - crop (both ends included)."""
    return [int(round(v)) for v in np.linspace(0, length - crop, n)]


def multicrop_boxes(h: int, w: int, crop: int, n: int = 5):
    """(top, left) of the n x n grid of crops (corners included)."""
    return [(y, x) for y in grid_offsets(h, crop, n) for x in grid_offsets(w, crop, n)]


def multicrop_batch(image: np.ndarray, crop: int, n: int = 5) -> np.ndarray:
    """(2 n^2, crop, crop, C): the grid crops, then their horizontal flips."""
    h, w = image.shape[:2]
    crops = np.stack([image[y:y + crop, x:x + crop] for y, x in multicrop_boxes(h, w, crop, n)])
    return np.concatenate([crops, crops[:, :, ::-1]])


class Net:
    """One set of weights with jitted standard and dense forwards."""

    def __init__(self, weights: str | None = None, *, model=None, variables=None, meta=None):
        if weights is not None:
            variables, meta = checkpoint.load_weights(weights)
            model = checkpoint.model_from_meta(meta)
        self.variables, self.meta, self.model = variables, meta, model
        self.d = data_config(self.meta)
        self._logits = models.jit_eval(lambda v, x: self.model.apply(v, x, train=False))
        self._scores = models.jit_eval(lambda v, x: self.model.apply(v, x, train=False,
                                                                     dense=True))

    def softmax(self, images):
        return np.asarray(jax.nn.softmax(self._logits(self.variables, jnp.asarray(images))))

    def dense_softmax(self, image):
        """Spatially averaged class score map -> soft-max, for one whole image."""
        scores = self._scores(self.variables, jnp.asarray(image[None]))
        return np.asarray(jax.nn.softmax(scores.mean(axis=(1, 2))))[0]


def rescaled(image_bytes, d, q: int, crop: bool) -> np.ndarray:
    return preprocess.eval_example(image_bytes, d, scale=q, crop=crop).numpy()


def posterior(net: Net, image_bytes, protocol: str, scales, *, flip: bool = True,
              crop_size: int | None = None) -> np.ndarray:
    """Soft-max posterior of one encoded image under `protocol`, averaged over `scales`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    crop = crop_size or net.d.image_size
    per_scale = []
    for q in scales:
        parts = []
        if protocol == "center":
            image = rescaled(image_bytes, net.d, q, crop=True)  # torchvision: no flip
            parts.append(net.softmax(image[None])[0])
        if protocol in ("dense", "dense+multicrop"):
            image = rescaled(image_bytes, net.d, q, crop=False)
            views = [image, image[:, ::-1]] if flip else [image]
            parts.append(np.mean([net.dense_softmax(v) for v in views], axis=0))
        if protocol in ("multicrop", "dense+multicrop"):
            image = rescaled(image_bytes, net.d, q, crop=False)
            parts.append(net.softmax(multicrop_batch(image, crop)).mean(0))
        per_scale.append(np.mean(parts, axis=0))
    return np.mean(per_scale, axis=0)


def evaluate(nets: list[Net], dataset: str, split: str, protocol: str, scales, *,
             data_dir=None, flip: bool = True, limit=None, progress: bool = True) -> dict:
    """Top-1/top-5 error of the (fused) nets over every example of the split once."""
    source = input_pipeline.make_source(dataset, split, data_dir)
    ds = source.epoch_dataset(0, False, 0)
    if limit:
        ds = ds.take(limit)
    n = min(limit or source.num_examples, source.num_examples)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"eval {protocol}", unit="img", dynamic_ncols=True)
    count = top1 = top5 = 0
    skipped = []
    t0 = time.time()
    for i, (raw, label) in enumerate(ds.as_numpy_iterator()):
        try:
            p = np.mean([posterior(net, tf.constant(raw), protocol, scales, flip=flip)
                         for net in nets], axis=0)
        except tf.errors.InvalidArgumentError:
            skipped.append(source.key(0, i, None))
            continue
        ranked = np.argsort(-p)
        count += 1
        top1 += int(ranked[0] == label)
        top5 += int(label in ranked[:5])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(img_per_s=f"{count / (time.time() - t0):.1f}")
    if bar is not None:
        bar.close()
    return dict(protocol=protocol, scales=list(scales), nets=len(nets), images=count,
                top1_err=1 - top1 / max(count, 1), top5_err=1 - top5 / max(count, 1),
                skipped=len(skipped))


def format_result(r: dict) -> str:
    return (f"{'protocol':<16} {'scales':<16} {'nets':>4} {'images':>7} {'top-1 err':>10} "
            f"{'top-5 err':>10}\n"
            f"{r['protocol']:<16} {','.join(map(str, r['scales'])):<16} {r['nets']:>4} "
            f"{r['images']:>7} {100 * r['top1_err']:>9.2f}% {100 * r['top5_err']:>9.2f}%")


def main(args) -> None:
    dirs = [d for d in (args.ensemble or "").split(",") if d] or [args.weights]
    if not dirs[0]:
        raise ValueError("give --weights DIR or --ensemble DIR1,DIR2,...")
    nets = [Net(d) for d in dirs]
    if args.scales:
        scales = [int(s) for s in args.scales.split(",")]
    else:
        d = nets[0].d
        scales = [d.image_size if d.recipe == "small" else d.eval_scale]
    r = evaluate(nets, args.data, args.split, args.protocol, scales, data_dir=args.data_dir,
                 limit=args.limit, progress=not args.json)
    print(json.dumps(r) if args.json else format_result(r))
