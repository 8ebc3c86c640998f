"""The paper's test protocols (Sec. 3.2), over weights directories and a dataset split.

center          rescale to Q, centre crop (torchvision style).
dense           rescale the whole image to Q, run the fully-convolutional net, average the
                class score map spatially, soft-max; averaged with the flipped image.
multicrop       5x5 regular grid of crops x 2 flips = 50 crops per scale, soft-max averaged.
The flips follow the weights' own training recipe (meta.json's preprocessing.flip: a net
trained without flips is not averaged with mirror images it never saw); `flip=` overrides.
dense+multicrop both, averaged (the paper's best single-net result, Table 5).
Several scales Q and several nets (fusion, Table 6) average soft-max posteriors.

How it runs at ImageNet scale: every image becomes a list of weighted *views* (a crop, or
a whole rescaled image for dense). Views of the same shape, from many images, are batched
and sharded over this process's devices. Dense views are zero-padded up to a multiple of
`weights.DENSE_BUCKET` pixels a side and the net masks the padding after every layer
(`VGG(valid=...)`), so the score map equals the unpadded one while the number of compiled
shapes stays bounded whatever the number of images. With several processes each takes
its own shard of the split (every example once overall) and the counts are summed.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from vgg_jax import input_pipeline, mesh, preprocess, runtime
from vgg_jax.choices import PROTOCOLS
from vgg_jax.errors import UserError, check_choice
from vgg_jax.weights import Net, bucket, pad_to

with runtime.tensorflow_banners_filtered():
    import tensorflow as tf



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
    weight: float          # its share of the image's fused posterior
    array: np.ndarray      # (h, w, C): a crop, or a whole image padded to a bucket
    valid: tuple | None    # true (h, w) inside `array` for dense views, else None


def check_protocol(protocol: str) -> None:
    check_choice("protocol", protocol, PROTOCOLS)


def needs(protocol: str) -> tuple[bool, bool]:
    """(needs the centre crop, needs the whole rescaled image)."""
    return protocol == "center", protocol != "center"


def image_views(image_id, rescaled, protocol: str, crop: int, flip: bool, weight: float):
    """The views of one image at one scale Q, weighted so that they sum to `weight`:
    `rescaled` is {'center': centre crop, 'whole': whole image rescaled to Q}."""
    if protocol == "center":  # torchvision's centre crop: no flip
        return [View(image_id, weight, rescaled["center"], None)]
    whole = rescaled["whole"]
    parts = []
    if protocol in ("dense", "dense+multicrop"):
        h, w = whole.shape[:2]
        if min(h, w) < crop:
            raise UserError(f"dense evaluation at a scale giving {h}x{w} is smaller than "
                             f"the crop {crop}: use Q >= {crop}")
        flips = [whole, whole[:, ::-1]] if flip else [whole]
        hb, wb = bucket(h), bucket(w)
        parts.append([View(image_id, 0.0, pad_to(v, hb, wb), (h, w)) for v in flips])
    if protocol in ("multicrop", "dense+multicrop"):
        parts.append([View(image_id, 0.0, c, None)
                      for c in multicrop_batch(whole, crop, flip=flip)])
    for part in parts:
        for v in part:
            v.weight = weight / (len(parts) * len(part))
    return [v for part in parts for v in part]


class Batcher:
    """Collects views by (net, shape) and runs them in fixed-size batches: crops in
    batches of `batch_size`, dense views in batches of about the same number of pixels.
    A partial batch (at a flush) runs at the full size halved as often as it still fits,
    so each shape compiles at most log2(batch) + 1 times, whatever the number of images.
    An image's posterior is complete when all its views have run; `on_done(image_id,
    posterior)` is then called."""

    def __init__(self, nets, batch_size: int, crop: int, on_done, max_pending: int = 0):
        self.nets, self.batch_size, self.crop, self.on_done = nets, batch_size, crop, on_done
        self.max_pending = max_pending or 4 * batch_size
        self.buffers: dict[tuple, list[View]] = {}
        self.pending: dict[int, list] = {}  # image -> [posterior sum, views left]
        self.shapes: set = set()

    def batch_for(self, net: Net, shape) -> int:
        b = self.batch_size
        if shape[0] * shape[1] > self.crop * self.crop:  # whole images: same pixel budget
            b = max(1, b * self.crop * self.crop // (shape[0] * shape[1]))
        return -(-b // net.num_devices) * net.num_devices

    def add(self, image_id, views_per_net):
        total = sum(len(v) for v in views_per_net)
        self.pending[image_id] = [0.0, total]
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
        probs = net.padded_posteriors(images, valid, size)
        for v, p in zip(views, probs):
            state = self.pending[v.image]
            state[0] = state[0] + v.weight * p
            state[1] -= 1
            if state[1] == 0:
                del self.pending[v.image]
                self.on_done(v.image, state[0])


# ----------------------------------------------------------------------------- protocols

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

    def __call__(self, image_bytes):
        out = []
        for d in self.configs:
            for q in self.scales:
                if self.center:
                    out.append(preprocess.eval_example(image_bytes, d, scale=q, crop=True))
                if self.whole:
                    out.append(preprocess.eval_example(image_bytes, d, scale=q, crop=False))
        return tuple(out)

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


def all_views(nets, rescaler, flat, image_id, protocol, crop, flip):
    """Every net's views of one image; `flip` None: each net's own (Net.flip)."""
    weight = 1.0 / (len(nets) * len(rescaler.scales))
    views = []
    for n, net in enumerate(nets):
        views.append([v for r in rescaler.split(flat, n)
                      for v in image_views(image_id, r, protocol, crop or net.d.image_size,
                                           net.flip if flip is None else flip, weight)])
    return views


def posterior(net: Net | list, image_bytes, protocol: str, scales, *, flip: bool | None = None,
              crop_size: int | None = None) -> np.ndarray:
    """Soft-max posterior of one encoded image under `protocol`, averaged over `scales`
    (and over the nets, given a list)."""
    check_protocol(protocol)
    nets = net if isinstance(net, list) else [net]
    rescaler = Rescaler(nets, protocol, scales)
    out = {}
    batcher = Batcher(nets, 64, crop_size or nets[0].d.image_size,
                      lambda i, p: out.__setitem__(i, p))
    batcher.add(0, all_views(nets, rescaler, rescaler(image_bytes), 0, protocol, crop_size,
                             flip))
    batcher.flush()
    return out[0]


def evaluate(nets: list[Net], dataset: str, split: str, protocol: str, scales, *,
             data_dir=None, flip: bool | None = None, limit=None, progress: bool = True,
             batch_size: int = 64, crop_size: int | None = None) -> dict:
    """Top-1/top-5 error (and the mean log-loss) of the (fused) nets over every example
    of the split once. With several processes, each evaluates its own shard on its own
    devices and the counts are summed; `limit` takes the first ceil(limit / processes)
    examples of each shard."""
    check_protocol(protocol)
    pidx, pcount = jax.process_index(), jax.process_count()
    source = input_pipeline.make_source(dataset, split, data_dir, pidx, pcount)
    n_local = source.num_examples if not limit else min(-(-limit // pcount),
                                                        source.num_examples)
    rescaler = Rescaler(nets, protocol, scales)
    ds = source.epoch_dataset(0, False, 0).take(n_local).enumerate()
    ds = ds.map(lambda pos, ex: (pos, ex[1], rescaler(ex[0])),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=False).prefetch(4)

    bar = None
    if progress and pidx == 0:
        from tqdm import tqdm
        bar = tqdm(total=source.total_examples if not limit else min(limit, source.total_examples),
                   desc=f"eval {protocol} {split}", unit="img", dynamic_ncols=True)
    labels, sums, skipped = {}, np.zeros(4), []  # sums: count, top1, top5, -log p

    def done(image_id, p):
        label = labels.pop(image_id)
        ranked = np.argsort(-p)
        sums[:] += (1, ranked[0] == label, label in ranked[:5],
                    -np.log(max(float(p[label]), 1e-30)))
        if bar is not None:
            bar.update(pcount)  # every process moves at about the same pace

    batcher = Batcher(nets, batch_size, crop_size or nets[0].d.image_size, done)
    def skip(start, stop):  # positions that failed to decode: skipped and named
        for missing in range(start, stop):
            skipped.append(source.key(0, missing, None))
            input_pipeline.log.warning("skipped an image that failed to decode: %s",
                                       skipped[-1])

    expected, t0 = 0, time.time()
    for pos, label, flat in ds.as_numpy_iterator():
        skip(expected, int(pos))
        expected = int(pos) + 1
        labels[int(pos)] = int(label)
        batcher.add(int(pos), all_views(nets, rescaler, flat, int(pos), protocol, crop_size,
                                        flip))
        if bar is not None:
            bar.set_postfix(img_per_s=f"{sums[0] * pcount / (time.time() - t0):.1f}")
    skip(expected, n_local)  # the last images of the shard too
    batcher.flush()
    if bar is not None:
        bar.close()
    images, top1, top5, nll, n_skipped = mesh.allgather_sum([*sums, len(skipped)])
    count = max(images, 1)
    return dict(dataset=source.name, split=split, protocol=protocol, scales=list(scales),
                nets=len(nets), images=int(images), top1_err=1 - top1 / count, top5_err=1 - top5 / count, loss=nll / count,
                skipped=int(n_skipped), processes=pcount, devices=nets[0].num_devices * pcount,
                batch_shapes=len(batcher.shapes))


def format_result(r: dict) -> str:
    return (f"{'split':<12} {'protocol':<16} {'scales':<16} {'nets':>4} {'images':>7} "
            f"{'top-1 err':>10} {'top-5 err':>10}\n"
            f"{r['split']:<12} {r['protocol']:<16} {','.join(map(str, r['scales'])):<16} "
            f"{r['nets']:>4} {r['images']:>7} {100 * r['top1_err']:>9.2f}% "
            f"{100 * r['top5_err']:>9.2f}%")


def default_scales(d) -> list[int]:
    """The test scale when none is given: the crop size for the 'small' recipe, else Q
    (data.eval_scale)."""
    return [d.image_size if d.recipe == "small" else d.eval_scale]


def main(*, data: str, weights: str | None = None, ensemble=(), split: str = "test",
         data_dir: str | None = None, protocol: str = "center", scales=(),
         crop: int | None = None, flip: bool | None = None, batch_size: int = 64,
         limit: int | None = None,
         json_output: bool = False, distributed: bool = False,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> dict:
    """`vgg-jax evaluate`: print (and return) the result of `protocol` over a split with
    one net (`weights`) or the fusion of several (`ensemble`)."""
    if distributed:
        mesh.initialize_distributed(coordinator_address, num_processes, process_id)
    dirs = list(ensemble) or ([weights] if weights else [])
    if not dirs:
        raise UserError("give --weights DIR or --ensemble DIR1,DIR2,...")
    nets = [Net(d) for d in dirs]
    r = evaluate(nets, data, split, protocol, list(scales) or default_scales(nets[0].d),
                 data_dir=data_dir, flip=flip, limit=limit, progress=not json_output,
                 batch_size=batch_size, crop_size=crop)
    if jax.process_index() == 0:
        print(json.dumps(r) if json_output else format_result(r))
    return r
