"""A split read once, in order, for evaluation and statistics: every example of this
process's shard exactly once (`stream`; `eval_batches` as fixed-size padded batches with a
mask, so that collective eval steps line up over processes), and one accounting of the
images that fail to decode (`Skipped`: each logged with its path, or its TFDS example
number, as it is found; the count and the names, over every process, in every command's
summary and JSON).
"""
from __future__ import annotations

import json
import logging
import math

import jax
import numpy as np
import tensorflow as tf

from vgg_jax import box_views, mesh, preprocess
from vgg_jax.errors import UserError
from vgg_jax.input_pipeline import MAX_BOXES, Source, make_source


log = logging.getLogger(__name__)


class Skipped:
    """The images of this process's shard that failed to decode: each logged with its name
    as it is found; `everywhere()` gathers every process's (a collective)."""

    def __init__(self, source: Source, shuffle_seed: int | None = None):
        self.source, self.seed, self.names = source, shuffle_seed, []

    def gap(self, start: int, stop: int) -> None:
        """Positions start..stop-1 of the shard (in epoch 0's order, shuffled with
        `shuffle_seed` if given) never came: they failed to decode."""
        for pos in range(start, stop):
            self.names.append(self.source.key(0, pos, self.seed))
            log.warning("skipped an image that failed to decode: %s", self.names[-1])

    def arrived(self, expected: int, positions) -> int:
        """Records the positions from `expected` up to each arriving one that never came;
        returns the position expected next."""
        for pos in positions:
            self.gap(expected, int(pos))
            expected = int(pos) + 1
        return expected

    def everywhere(self) -> list[str]:
        return mesh.allgather_strings(self.names)

    def summary(self) -> dict:
        """{'skipped': count, 'skipped_images': names} over every process."""
        names = self.everywhere()
        return dict(skipped=len(names), skipped_images=names)


def skipped_line(names, what: str = "") -> str:
    """A summary's line naming the images that failed to decode (empty when none did)."""
    if not names:
        return ""
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return (f"\nskipped {len(names)} {what + ' ' if what else ''}image(s) that failed to "
            f"decode: {', '.join(names[:5])}{more}")


def local_count(source: Source, limit: int | None) -> int:
    """This process's images: its whole shard, or its ceil(limit / processes) first."""
    return (source.num_examples if not limit else
            min(-(-limit // jax.process_count()), source.num_examples))


def _positioned(source: Source, decode, view, n_local: int, seed, view_boxes=None):
    """(position, label, view(decode(image_bytes))) of the first `n_local` images of the
    shard, in tf.data's parallel maps; images that fail to decode are left out (positions
    say which). Only `decode` may fail that way: an error in `view` is raised."""
    ds = source.epoch_dataset(0, seed is not None, seed or 0).take(n_local).enumerate()
    ds = ds.map(preprocess.as_written(lambda pos, ex: (pos, ex[1], decode(ex[0]))),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=False)
    def viewed(pos, label, image):
        if isinstance(label, dict):  # boxes: where the objects are in the view
            shape = tf.shape(image)
            label = dict(label, boxes=view_boxes(label["boxes"], shape[0], shape[1]))
        return pos, label, view(image)

    return ds.map(preprocess.as_written(viewed),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def stream(source: Source, decode, view, n_local: int, skipped: Skipped, view_boxes=None):
    """(position, label, view(decode(image_bytes))) for the first `n_local` images of this
    process's shard in order (epoch 0's shuffled order with skipped's `shuffle_seed`),
    both tf ops run in tf.data's parallel maps; images that fail to decode are left out
    and recorded in `skipped`. A source with boxes needs `view_boxes(boxes, h, w)`: where
    the objects of a decoded (h, w) image are in its view."""
    expected = 0
    for pos, label, out in _positioned(source, decode, view, n_local, skipped.seed,
                                       view_boxes) \
            .prefetch(4).as_numpy_iterator():
        expected = skipped.arrived(expected, [pos])
        yield int(pos), label, out
    skipped.gap(expected, n_local)  # the last images of the shard too


def eval_batches(source: Source, data_cfg, local_batch: int, *, limit=None,
                 skipped: Skipped | None = None):
    """Every example of this process's shard once, in order, in batches of exactly
    `local_batch` with a 0/1 `mask`; every process yields the same number of batches
    (ceil(largest shard / batch)) so collective eval steps line up: the centre crop of
    data_cfg's eval scale. Undecodable images are skipped, logged with their names and
    recorded in `skipped` (a Skipped of `source`)."""
    d = data_cfg
    n_local = source.num_examples if limit is None else min(limit, source.num_examples)
    n_max = source.max_shard_examples if limit is None else min(limit, source.max_shard_examples)
    num_batches = math.ceil(n_max / local_batch)
    skipped = Skipped(source) if skipped is None else skipped
    ds = _positioned(source, lambda raw: preprocess.eval_decode(raw, d),
                     lambda image: preprocess.eval_view(image, d), n_local, skipped.seed,
                     lambda boxes, h, w: box_views.eval_boxes(boxes, h, w, d))
    produced, expected = 0, 0  # batched by tf.data; the positions name what was skipped
    for pos, label, image in ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        expected = skipped.arrived(expected, pos)
        yield _pad(image, label, local_batch)
        produced += 1
    skipped.gap(expected, n_local)
    shape = (d.image_size, d.image_size, d.channels)
    label_shape = (source.num_classes,) if source.multi_label else ()
    label = np.zeros((0, *label_shape), np.int32)
    if source.boxes:
        label = {"label": label, "boxes": np.zeros((0, MAX_BOXES, 4), np.float32)}
    template = _pad(np.zeros((0, *shape), np.uint8), label, local_batch)
    for _ in range(num_batches - produced):  # the batches another process still runs
        yield template


def _pad(image, label, size):
    """A batch of exactly `size` with its 0/1 mask; `label` an array, or a localisation
    dataset's {'label', 'boxes'} (padded the same way)."""
    batch = {"image": image, **(label if isinstance(label, dict) else {"label": label})}
    n = len(image)
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1
    pad = size - n
    if pad:
        batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
    return dict(batch, label=batch["label"].astype(np.int32), mask=mask)


# ----------------------------------------------------------------------------- CLI

def dataset_stats(dataset, split="train", data_dir=None, max_images=10_000, channels=3):
    """Mean pixel (0..255) and the PCA of RGB on [0, 1] pixels (for the colour shift),
    over `max_images` drawn at random from the whole split (all of them when it has no
    more; a folder's first files would be its first classes only). Undecodable images
    are skipped, counted and named."""
    source = make_source(dataset, split, data_dir)
    skipped = Skipped(source, 0 if max_images < source.num_examples else None)
    pixel_rows = lambda image: tf.reshape(tf.cast(image, tf.float64), (-1, channels))
    n, images, total, outer = 0, 0, np.zeros(channels), np.zeros((channels, channels))
    for _, _, pixels in stream(source, lambda b: preprocess.decode(b, channels), pixel_rows,
                               min(max_images, source.num_examples), skipped):
        n += len(pixels)
        images += 1
        total += pixels.sum(0)
        outer += pixels.T @ pixels
    if not images:
        raise UserError(f"no decodable image among the {min(max_images, source.num_examples)} "
                        f"read from {dataset} ({split})")
    mean = total / n
    cov = (outer / n - np.outer(mean, mean)) / 255.0 ** 2
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    return {"mean": mean.round(3).tolist(), "std": np.sqrt(np.diag(cov) * 255.0 ** 2).round(3).tolist(),
            "pca_eigval": eigval[order].round(5).tolist(),
            "pca_eigvec": eigvec[:, order].round(4).tolist(), "pixels": int(n),
            "images": images, **skipped.summary()}


def main_stats(*, dataset: str, split: str = "train", data_dir: str | None = None,
               max_images: int = 10_000):
    print(json.dumps(dataset_stats(dataset, split, data_dir, max_images)))
