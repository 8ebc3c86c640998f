"""Images -> views -> batched, sharded forwards -> one result per image: the single path
that `evaluate` (the paper's test protocols), `embed --protocol paper` and `transfer`
(Appendix B's descriptors) and `predict --dense` run their views through.

A *view* is what the net sees of an image: a crop, or the whole image rescaled to Q
(dense), zero-padded up to a multiple of DENSE_BUCKET pixels a side with its true size
kept (`VGG(valid=...)` masks the padding after every layer, so the scores equal the
unpadded ones while the number of compiled shapes stays bounded). Each view carries a
weight and a *slot*: an image's result is, per slot, the weighted sum of its views'
outputs (posteriors, or fc6/fc7 features). Views of the same shape from many images run
together (`Batcher`), sharded over this process's devices.

Images that fail to decode are skipped and accounted for as everywhere else
(`eval_data.Skipped`).
"""
from __future__ import annotations

import dataclasses
import numpy as np

from vgg_jax import eval_data, input_pipeline, preprocess
from vgg_jax.choices import PROTOCOLS
from vgg_jax.errors import UserError, check_choice

DENSE_BUCKET = 32  # dense inputs are padded to multiples of this (paper Q's are multiples)


def bucket(n: int, multiple: int = DENSE_BUCKET) -> int:
    return -(-n // multiple) * multiple


def pad_to(image, h, w):
    out = np.zeros((h, w, image.shape[-1]), image.dtype)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def dense_view(image):
    """(padded image, (h, w)): a whole image as the dense forward takes it."""
    h, w = image.shape[:2]
    return pad_to(image, bucket(h), bucket(w)), (h, w)


# ----------------------------------------------------------------------------- multi-crop

def grid_offsets(length: int, crop: int, n: int = 5) -> list[int]:
    """n crop starts spread evenly from 0 to length - crop (both ends included)."""
    return [int(round(v)) for v in np.linspace(0, length - crop, n)]


def multicrop_boxes(h: int, w: int, crop: int, n: int = 5):
    """(top, left) of the n x n grid of crops (corners included)."""
    return [(y, x) for y in grid_offsets(h, crop, n) for x in grid_offsets(w, crop, n)]


def multicrop_batch(image: np.ndarray, crop: int, n: int = 5, flip: bool = True) -> np.ndarray:
    """(2 n^2, crop, crop, C): the grid crops, then their horizontal flips (n^2 crops
    without `flip`)."""
    h, w = image.shape[:2]
    crops = np.stack([image[y:y + crop, x:x + crop] for y, x in multicrop_boxes(h, w, crop, n)])
    return np.concatenate([crops, crops[:, :, ::-1]]) if flip else crops


# ----------------------------------------------------------------------------- views

@dataclasses.dataclass
class View:
    image: int             # which image (its position in the stream)
    weight: float          # its share of the image's result in its slot
    array: np.ndarray      # (h, w, C): a crop, or a whole image padded to a bucket
    valid: tuple | None    # true (h, w) inside `array` for dense views, else None
    slot: int = 0          # which part of the image's result it adds to


def check_protocol(protocol: str) -> None:
    check_choice("protocol", protocol, PROTOCOLS)


def needs(protocol: str) -> tuple[bool, bool]:
    """(needs the centre crop, needs the whole rescaled image)."""
    return protocol == "center", protocol != "center"


def image_views(image_id, rescaled, protocol: str, crop: int, flip: bool, weight: float,
                slot: int = 0):
    """The views of one image at one scale Q, weighted so that they sum to `weight`:
    `rescaled` is {'center': centre crop, 'whole': whole image rescaled to Q}."""
    if protocol == "center":  # torchvision's centre crop: no flip
        return [View(image_id, weight, rescaled["center"], None, slot)]
    whole = rescaled["whole"]
    parts = []
    if protocol in ("dense", "dense+multicrop"):
        padded, valid = dense_view(whole)
        flips = [padded, dense_view(whole[:, ::-1])[0]] if flip else [padded]
        parts.append([View(image_id, 0.0, v, valid, slot) for v in flips])
    if protocol in ("multicrop", "dense+multicrop"):
        h, w = whole.shape[:2]
        if min(h, w) < crop:
            raise UserError(f"multi-crop evaluation at a scale giving {h}x{w} is smaller "
                            f"than the crop {crop}: use Q >= {crop}")
        parts.append([View(image_id, 0.0, c, None, slot)
                      for c in multicrop_batch(whole, crop, flip=flip)])
    for part in parts:
        for v in part:
            v.weight = weight / (len(parts) * len(part))
    return [v for part in parts for v in part]


def posteriors(net, images, valid, size):
    """The Batcher's forward for the test protocols: soft-max posteriors."""
    return net.padded_posteriors(images, valid, size)


def features(layer: str):
    """The Batcher's forward for Appendix B: `layer`'s (fc6/fc7) dense map, averaged."""
    return lambda net, images, valid, size: net.dense_features(images, valid, layer, size)


class Batcher:
    """Collects views by (net, shape) and runs them through `forward(net, images, valid,
    batch)` in fixed-size batches: crops in batches of `batch_size`, dense views in
    batches of about the same number of pixels. A partial batch (at a flush) runs at the
    full size halved as often as it still fits, so each shape compiles at most
    log2(batch) + 1 times, whatever the number of images. An image's result is complete
    when all its views have run: `on_done(image_id, [weighted sum per slot])`."""

    def __init__(self, nets, batch_size: int, crop: int, on_done, forward=posteriors,
                 max_pending: int = 0):
        self.nets, self.batch_size, self.crop, self.on_done = nets, batch_size, crop, on_done
        self.forward = forward
        self.max_pending = max_pending or 4 * batch_size
        self.buffers: dict[tuple, list[View]] = {}
        self.pending: dict[int, list] = {}  # image -> [{slot: sum}, views left]
        self.shapes: set = set()

    def batch_for(self, net, shape) -> int:
        b = self.batch_size
        if shape[0] * shape[1] > self.crop * self.crop:  # whole images: same pixel budget
            b = max(1, b * self.crop * self.crop // (shape[0] * shape[1]))
        return -(-b // net.num_devices) * net.num_devices

    def add(self, image_id, views_per_net):
        for n, views in enumerate(views_per_net):  # too small for the net: refused now
            dense = [v.valid for v in views if v.valid is not None]
            if dense:
                self.nets[n].check_dense_views(dense)
        total = sum(len(v) for v in views_per_net)
        self.pending[image_id] = [{}, total]
        for n, views in enumerate(views_per_net):
            for v in views:
                key = (n, v.array.shape, v.valid is not None)
                buf = self.buffers.setdefault(key, [])
                buf.append(v)
                if len(buf) >= self.batch_for(self.nets[n], v.array.shape):
                    self._run(key)
        if len(self.pending) > self.max_pending:
            self.flush()

    def flush(self):
        for key in list(self.buffers):
            if self.buffers[key]:
                self._run(key)

    def _run(self, key):
        n, shape, dense = key
        views, self.buffers[key] = self.buffers[key], []
        net = self.nets[n]
        size = self.batch_for(net, shape)
        while size // 2 >= len(views) and (size // 2) % net.num_devices == 0:
            size //= 2  # a partial batch (a flush): the smallest halving that holds it
        self.shapes.add((n, size, *shape, dense))
        images = np.stack([v.array for v in views])
        valid = np.asarray([v.valid for v in views], np.int32) if dense else None
        outs = self.forward(net, images, valid, size)
        for v, out in zip(views, outs):
            state = self.pending[v.image]
            state[0][v.slot] = state[0].get(v.slot, 0.0) + v.weight * out
            state[1] -= 1
            if state[1] == 0:
                del self.pending[v.image]
                self.on_done(v.image, [state[0][s] for s in sorted(state[0])])


class Rescaler:
    """The decoded, rescaled images every net needs at every Q, as tf ops (run inside
    tf.data's parallel map for a split, or eagerly for one image)."""

    def __init__(self, nets, protocol: str, scales):
        self.center, self.whole = needs(protocol)
        self.scales = list(scales)
        configs = []  # nets with the same preprocessing share it
        self.config_of = []
        for net in nets:
            d = net.d.to_dict()
            if d not in configs:
                configs.append(d)
            self.config_of.append(configs.index(d))
        self.configs = [nets[self.config_of.index(i)].d for i in range(len(configs))]

    def decode(self, image_bytes):
        """The image decoded once per preprocessing config (the step a broken file fails)."""
        return tuple(preprocess.eval_decode(image_bytes, d) for d in self.configs)

    def views(self, decoded):
        out = []
        for d, image in zip(self.configs, decoded):
            for q in self.scales:
                if self.center:
                    out.append(preprocess.eval_view(image, d, scale=q, crop=True))
                if self.whole:
                    out.append(preprocess.eval_view(image, d, scale=q, crop=False))
        return tuple(out)

    def __call__(self, image_bytes):
        return self.views(self.decode(image_bytes))

    def split(self, flat, net_index: int) -> list[dict]:
        """Per scale {'center', 'whole'} arrays of `net_index` from __call__'s output."""
        per = (self.center + self.whole) * len(self.scales)
        start = self.config_of[net_index] * per
        mine, out = list(flat[start:start + per]), []
        for _ in self.scales:
            r = {}
            if self.center:
                r["center"] = np.asarray(mine.pop(0))
            if self.whole:
                r["whole"] = np.asarray(mine.pop(0))
            out.append(r)
        return out


class Plan:
    """What to make of each image: `protocol`'s views at every scale for every net, the
    flips each net was trained with (`flip` None) or `flip`, and `crop` (each net's own
    when None). `slot_per_scale`: each scale's views add up in their own slot (Appendix
    B's stacked descriptors); otherwise nets and scales share one slot, equally weighted."""

    def __init__(self, nets, protocol: str, scales, *, flip: bool | None = None,
                 crop: int | None = None, slot_per_scale: bool = False):
        check_protocol(protocol)
        self.nets, self.protocol, self.flip, self.crop = nets, protocol, flip, crop
        self.slot_per_scale = slot_per_scale
        self.rescaler = Rescaler(nets, protocol, scales)

    def views(self, flat, image_id):
        """Every net's views of one image, from the rescaler's output `flat`."""
        scales = self.rescaler.scales
        per_slot = 1 if self.slot_per_scale else len(scales)
        weight = 1.0 / (len(self.nets) * per_slot)
        out = []
        for n, net in enumerate(self.nets):
            flip = net.flip if self.flip is None else self.flip
            out.append([v for s, r in enumerate(self.rescaler.split(flat, n))
                        for v in image_views(image_id, r, self.protocol,
                                             self.crop or net.d.image_size, flip, weight,
                                             s if self.slot_per_scale else 0)])
        return out


# ----------------------------------------------------------------------------- a split

def run_split(plan: Plan, source: input_pipeline.Source, *, forward=posteriors,
              batch_size: int = 64, limit: int | None = None):
    """Every image of this process's shard (its first ceil(limit / processes) with
    `limit`) through `plan`'s views. Returns (results, skipped, batcher): `results` yields
    (position, label, [result per slot]) as images complete (not in order); `skipped`
    (Skipped) is complete once `results` is exhausted."""
    skipped = eval_data.Skipped(source)
    batcher = Batcher(plan.nets, batch_size, plan.crop or plan.nets[0].d.image_size,
                      None, forward)

    def results():
        labels, done = {}, []
        batcher.on_done = lambda image, slots: done.append((image, labels.pop(image), slots))
        for pos, label, flat in eval_data.stream(
                source, plan.rescaler.decode, plan.rescaler.views,
                eval_data.local_count(source, limit), skipped):
            labels[pos] = label
            batcher.add(pos, plan.views(flat, pos))
            yield from done
            done.clear()
        batcher.flush()
        yield from done

    return results(), skipped, batcher


def run_image(plan: Plan, image_bytes, forward=posteriors, batch_size: int = 64) -> list:
    """One encoded image through `plan`'s views: its result per slot."""
    out = {}
    batcher = Batcher(plan.nets, batch_size, plan.crop or plan.nets[0].d.image_size,
                      lambda i, slots: out.__setitem__(i, slots), forward)
    batcher.add(0, plan.views(plan.rescaler(image_bytes), 0))
    batcher.flush()
    return out[0]


def posterior(net, image_bytes, protocol: str, scales, *, flip: bool | None = None,
              crop_size: int | None = None) -> np.ndarray:
    """Soft-max posterior of one encoded image under `protocol`, averaged over `scales`
    (and over the nets, given a list of weights.Net)."""
    nets = net if isinstance(net, list) else [net]
    return run_image(Plan(nets, protocol, scales, flip=flip, crop=crop_size), image_bytes)[0]
