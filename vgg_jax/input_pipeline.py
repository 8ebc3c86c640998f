"""Images from TFDS or an image folder, through tf.data, to NumPy batches.

A TFDS split is read as one even part per process (tfds.even_splits, whole files where it
can); an image folder in one global order per epoch, of which each process takes its block
of every global batch. Training order is a pure function of (seed, epoch) and can be
entered at any position without reading what comes before; each example's augmentation
is a function of (seed, epoch, example), so the iterator's state is just {epoch, offset}
and resuming from it replays exactly what an uninterrupted run would have seen. Images
that fail to decode are skipped, counted and logged with their path. (Reading a split
once for evaluation: `eval_data`; finding and preparing TFDS datasets: `prepared`.)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import box_views, preprocess
from vgg_jax.errors import NotFound, UserError
from vgg_jax.prepared import tfds_builder


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
log = logging.getLogger(__name__)

# tf.data must not grab the accelerators JAX uses.
tf.config.set_visible_devices([], "GPU")


# a TFDS name: NAME, NAME/CONFIG, NAME:VERSION, NAME/CONFIG:VERSION ('voc/2007')
TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[\w.+-]+)?(:[\d.*]+)?$")


def is_folder(dataset: str) -> bool:
    """An image folder is what exists on disk; anything else shaped like a TFDS name
    ('cifar10', 'voc/2007') is one, and the rest are folder paths (a missing one is
    reported as such)."""
    return os.path.isdir(dataset) or not TFDS_NAME.match(dataset)


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
    """One process's shard of one split: `epoch_dataset` yields (image_bytes, label)."""
    name: str
    split: str
    num_examples: int          # in this process's shard
    max_shard_examples: int    # largest shard over processes (eval steps must agree)
    total_examples: int
    class_names: list
    _dataset_fn: object = None
    _key_fn: object = None     # (epoch, position, shuffled) -> a path for logs, or None
    _train_fn: object = None   # (epoch, seed, start, block) -> (pos, uid, bytes, label)
    process_index: int = 0
    process_count: int = 1
    multi_label: bool = False  # labels are multi-hot (num_classes,) int32 vectors
    boxes: bool = False  # labels are {'label', 'boxes' (MAX_BOXES, 4)} (box_feature)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def epoch_dataset(self, epoch: int, shuffle: bool, seed: int) -> tf.data.Dataset:
        return self._dataset_fn(epoch, shuffle, seed)

    def train_dataset(self, epoch: int, seed: int, start: int = 0,
                      block: int = 1) -> tf.data.Dataset:
        """This process's examples of a training epoch in their shuffled order, from
        position `start` on, as (position, uid, image_bytes, label): `uid` numbers the
        example within the epoch across all processes (it seeds the augmentation). The
        order is a pure function of (seed, epoch), and `start` is reached without reading
        the examples before it (a resume late in an epoch costs what one early does).
        `block` is the per-process batch: where the order is global (image folders) each
        process takes its own `block` of every global batch."""
        return self._train_fn(epoch, seed, start, block)

    def key(self, epoch, position, shuffled, block=1):
        return (self._key_fn(epoch, position, shuffled, block) if self._key_fn else
                f"example #{position}")


def tfds_source(name, split, data_dir=None, process_index=0, process_count=1,
                shuffle_buffer=10_000, boxes: bool = False) -> Source:
    """A TFDS split; each process reads its own even part (tfds.even_splits), as whole
    files where it can, so no host reads another's examples. With `boxes`, each label is
    {'label', 'boxes'} (box_feature): a localisation dataset's."""
    builder = tfds_builder(name, data_dir)
    try:
        shards = tfds.even_splits(split, n=process_count)
        sizes = [builder.info.splits[s].num_examples for s in shards]
    except (ValueError, KeyError) as e:  # an unknown split name, or a bad slice of one
        known = ", ".join(sorted(builder.info.splits))
        why = str(e).splitlines()[0]
        why = "" if why.startswith("Unknown split") else f" ({why})"
        raise UserError(f"{name} has no split {split!r}{why}; its splits: {known} (slices "
                        f"like 'train[:10%]' work too)") from None
    class_names, label_of, multi = label_feature(builder)
    if boxes:
        boxes_of, class_of = box_feature(builder), label_of
        label_of = lambda ex: {"label": class_of(ex), "boxes": boxes_of(ex)}
    mine = shards[process_index]

    def dataset(epoch, shuffle, seed):
        if shuffle:  # the training order, without its positions
            return train(epoch, seed, 0, 1).map(
                preprocess.as_written(lambda pos, uid, image, label: (image, label)))
        ds = builder.as_dataset(split=mine, shuffle_files=False,
                                read_config=tfds.ReadConfig(try_autocache=False),
                                decoders={"image": tfds.decode.SkipDecoding()})
        return ds.map(preprocess.as_written(lambda ex: (ex["image"], label_of(ex))))

    def parse(record):
        ex = builder.info.features.deserialize_example(
            record, decoders={"image": tfds.decode.SkipDecoding()})
        return ex["image"], label_of(ex)

    pieces = builder.info.splits[mine].file_instructions  # (file, skip, take) each
    window = max(1, min(shuffle_buffer, sizes[process_index]))

    def train(epoch, seed, start, block):
        return _windowed_shuffle(pieces, window, _mix(seed, epoch, process_index), start,
                                 builder.data_dir).map(
            preprocess.as_written(lambda pos, record: (
                pos, pos * process_count + process_index, *parse(record))),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def key(epoch, position, shuffled, block=1):
        shard = f" of process {process_index}'s part" if process_count > 1 else ""
        return f"{name}:{split} example #{position}{shard}"

    return Source(name, split, sizes[process_index], max(sizes), sum(sizes), class_names,
                  dataset, key, train, process_index, process_count, multi, boxes)


MAX_BOXES = 16  # boxes kept per image (ILSVRC's validation images have up to a dozen)


def box_feature(builder):
    """example -> its boxes as (MAX_BOXES, 4) corner fractions (x0, y0, x1, y1), padded
    with empty boxes: a TFDS dataset's 'bboxes' (a sequence of BBoxFeature, as
    vgg_digits_canvas) or 'objects' with a 'bbox' (as voc), TFDS's (ymin, xmin, ymax, xmax)."""
    features = dict(builder.info.features.items())
    seq, objects = features.get("bboxes"), features.get("objects")
    if isinstance(seq, tfds.features.Sequence) and isinstance(seq.feature,
                                                              tfds.features.BBoxFeature):
        get = lambda ex: ex["bboxes"]
    elif isinstance(objects, tfds.features.Sequence) and "bbox" in objects.feature.keys():
        get = lambda ex: ex["objects"]["bbox"]
    else:
        raise UserError(f"{builder.name} has no boxes (a 'bboxes' feature, or 'objects' with a "
                        f"'bbox'): a box head (model.box_head) trains on a localisation "
                        f"dataset such as vgg_digits_canvas")

    def boxes_of(ex):
        b = tf.gather(tf.cast(get(ex), tf.float32)[:MAX_BOXES], [1, 0, 3, 2], axis=1)
        b = tf.pad(b, [[0, MAX_BOXES - tf.shape(b)[0]], [0, 0]])
        return tf.ensure_shape(b, (MAX_BOXES, 4))

    return boxes_of


def label_feature(builder):
    """(class names, example -> label, multi-label?) of a TFDS dataset: its 'label'
    (a ClassLabel), or its 'labels' (a sequence of ClassLabel, as VOC's) as a multi-hot
    vector."""
    features = dict(builder.info.features.items())
    if isinstance(features.get("label"), tfds.features.ClassLabel):
        return list(features["label"].names), lambda ex: ex["label"], False
    labels = features.get("labels")
    if (isinstance(labels, tfds.features.Sequence)
            and isinstance(labels.feature, tfds.features.ClassLabel)):
        k = labels.feature.num_classes
        return (list(labels.feature.names),
                lambda ex: tf.minimum(tf.reduce_sum(tf.one_hot(ex["labels"], k, dtype=tf.int32),
                                                    axis=0), 1), True)
    raise UserError(f"{builder.name} has neither a 'label' (ClassLabel) nor a 'labels' "
                    f"(sequence of ClassLabel) feature; its features: "
                    f"{', '.join(sorted(features.keys()))}")


def _windowed_shuffle(pieces, window: int, seed: int, start: int, data_dir: str):
    """The records of `pieces` (TFDS file instructions) in an order that can be entered
    anywhere: the pieces in a seeded order, read one after another, and each run of
    `window` consecutive records shuffled among themselves (a seeded permutation per
    window, like a shuffle buffer of that size). Entering at `start` opens the window
    holding it: whole pieces before it are passed over unread, and at most one piece's
    records plus one window are read and dropped, wherever `start` lies. Yields
    (position, serialized record) from `start` on."""
    order = np.random.default_rng(seed).permutation(len(pieces))
    takes = np.asarray([pieces[i].take for i in order], np.int64)
    ends = np.cumsum(takes)
    first_window = start // window
    window_start = first_window * window
    k = int(np.searchsorted(ends, window_start, side="right"))  # piece holding it
    if k >= len(order):
        return tf.data.Dataset.from_tensor_slices(
            (tf.zeros((0,), tf.int64), tf.zeros((0,), tf.string)))
    paths = [os.path.join(data_dir, os.path.basename(pieces[i].filename)) for i in order[k:]]
    skips = [pieces[i].skip for i in order[k:]]
    skips[0] += int(window_start - (ends[k] - takes[k]))
    counts = [int(pieces[i].take) for i in order[k:]]
    counts[0] -= skips[0] - pieces[order[k]].skip
    records = tf.data.Dataset.from_tensor_slices(
        (paths, np.asarray(skips, np.int64), np.asarray(counts, np.int64))).flat_map(
        preprocess.as_written(lambda p, skip, take: tf.data.TFRecordDataset(
            p, buffer_size=8 << 20).skip(skip).take(take)))
    windows = records.batch(window).enumerate(first_window)

    def shuffled(w, batch):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(batch)[0]), seed=tf.stack([tf.cast(seed, tf.int64), w]))
        return tf.data.Dataset.from_tensor_slices(tf.gather(batch, perm))

    ds = windows.flat_map(preprocess.as_written(shuffled)).skip(start - window_start)
    return ds.enumerate(start).prefetch(tf.data.AUTOTUNE)


def folder_index(root: str):
    """(paths, labels, class_names) of root/class_name/image files, sorted."""
    if not os.path.isdir(root):
        raise NotFound(f"image folder {root} does not exist (expected "
                                f"{root}/CLASS_NAME/*.jpg, one folder per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected "
                         f"{root}/CLASS_NAME/*.jpg)")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, c))
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UserError(f"class folder {os.path.join(root, c)} has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        paths += [os.path.join(root, c, f) for f in files]
        labels += [i] * len(files)
    return paths, np.asarray(labels, np.int64), classes


SPLIT_FOLDERS = ("train", "val", "validation", "test")
EVAL_SPLIT_FOLDERS = ("val", "validation", "test")  # one name for the held-out images


def split_folder(root: str, split: str | None) -> str:
    """The folder of `split` in an image folder. A folder with split sub-folders (train/,
    val/, validation/ or test/) gives root/split; asked for any held-out split name it
    takes whichever held-out folder exists, so train/ + val/ works whatever
    data.eval_split says. A folder of class folders only is its own every split."""
    if not split or not os.path.isdir(root):
        return root
    present = [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(root, s))]
    if not present:
        return root
    if split in present:
        return os.path.join(root, split)
    held_out = [s for s in EVAL_SPLIT_FOLDERS if s in present]
    if split in EVAL_SPLIT_FOLDERS and held_out:
        return os.path.join(root, held_out[0])
    raise NotFound(f"image folder {root} has no split {split!r}: its sub-folders are "
                   f"{', '.join(sorted(os.listdir(root)))}")


def folder_source(root, split=None, process_index=0, process_count=1) -> Source:
    """An image folder's split (`split_folder`). Training follows one global order per
    epoch (a seeded permutation of every file), cut into global batches of which process
    p takes the p-th block: each global batch holds the same images in the same rows
    whatever the process count, so runs on 1 or several processes (and resumes across
    them) see the same data."""
    root = split_folder(root, split)
    paths, labels, classes = folder_index(root)
    paths = np.asarray(paths, dtype=object)
    n = len(paths)

    def shard(everything, block):  # this process's part of an epoch's global order
        size = block * process_count
        whole = (n // size) * size
        blocks = everything[:whole].reshape(-1, process_count, block)[:, process_index]
        return np.concatenate([blocks.ravel(), everything[whole:][process_index::process_count]])

    def order(epoch, shuffle, seed, block=1):  # (uids, file indices) of this process
        uids = shard(np.arange(n), block)
        if not shuffle:
            return uids, uids
        return uids, np.random.default_rng(_mix(seed, epoch)).permutation(n)[uids]

    def files(o):
        ds = tf.data.Dataset.from_tensor_slices((paths[o].astype(str), labels[o]))
        return ds.map(preprocess.as_written(lambda p, l: (tf.io.read_file(p), l)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    def dataset(epoch, shuffle, seed):
        return files(order(epoch, shuffle, seed)[1])

    def train(epoch, seed, start, block):
        uids, o = order(epoch, True, seed, block)
        uids, o = uids[start:], o[start:]  # indexing: nothing before `start` is read
        ids = tf.data.Dataset.from_tensor_slices((np.arange(start, start + len(o)), uids))
        return tf.data.Dataset.zip(ids, files(o)).map(preprocess.as_written(lambda i, ex: (*i, *ex)))

    def key(epoch, position, shuffle_seed, block=1):
        return str(paths[order(epoch, shuffle_seed is not None, shuffle_seed, block)[1][position]])

    return Source(root, split or "", len(shard(np.arange(n), 1)), math.ceil(n / process_count),
                  n, classes, dataset, key, train, process_index, process_count)


def make_source(dataset: str, split: str, data_dir=None, process_index=0, process_count=1,
                shuffle_buffer=10_000, boxes: bool = False) -> Source:
    if is_folder(dataset):
        if boxes:
            raise UserError(f"{dataset} is an image folder, which has no boxes: a box head "
                            f"(model.box_head) trains on a TFDS dataset with boxes, such as "
                            f"vgg_digits_canvas")
        return folder_source(dataset, split, process_index, process_count)
    return tfds_source(dataset, split, data_dir, process_index, process_count, shuffle_buffer,
                       boxes)


def _mix(*ints) -> int:
    """A 31-bit seed from several ints (stable across runs and processes)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(1)[0]
               & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- train

def resume_position(saved: list[dict], process_index: int, process_count: int) -> dict:
    """This process's {'epoch', 'offset'} from the per-process positions a checkpoint
    holds. The same process count continues each process exactly where it stopped.
    Another count shares out what the saved processes had consumed of their epoch: an
    image folder's global order then continues at the same global position (exactly when
    the consumed count divides by the new process count); TFDS shards are per process, so
    there each new process continues at the same fraction of its own shard."""
    if len(saved) == process_count:
        return dict(saved[process_index])
    epoch = min(p["epoch"] for p in saved)
    behind = [p["offset"] for p in saved if p["epoch"] == epoch]
    consumed = sum(p["offset"] if p["epoch"] == epoch else max(behind) for p in saved)
    log.info("resuming %d processes' data positions on %d processes: epoch %d, offset %d",
             len(saved), process_count, epoch, consumed // process_count)
    return {"epoch": epoch, "offset": consumed // process_count}


class TrainIterator:
    """Endless training batches for this process: {'image': uint8 (B, H, W, C), 'label',
    and with data.colour_pca 'alpha' (B, 3), the colour shift's random coefficients};
    `pixels.Pixels` finishes the preprocessing on the device.

    `state` ({'epoch', 'offset'}: the next example's position in the epoch's order) is what
    a checkpoint stores; TrainIterator(..., state=saved) continues exactly there.
    """

    def __init__(self, source: Source, data_cfg, local_batch: int, seed: int, state=None):
        if local_batch > source.num_examples:
            raise UserError(f"per-process batch {local_batch} is larger than the "
                             f"{source.num_examples} examples of {source.name}:{source.split}")
        self.source, self.d, self.batch, self.seed = source, data_cfg, local_batch, seed
        self.state = dict(state or {"epoch": 0, "offset": 0})
        self.skipped: list[str] = []
        self._it = self._generate()

    def _epoch(self, epoch: int, offset: int):
        d, seed = self.d, self.seed

        def example_seed(uid):
            # the example's augmentation: one seed per (seed, epoch, example), the example
            # numbered across processes (for a folder: its place in the global order)
            return tf.stack([tf.constant(_mix(seed, epoch), tf.int64), uid])

        def read(pos, uid, image_bytes, label):
            seed = example_seed(uid)
            image, fused = preprocess.train_decode(image_bytes, seed, d)
            if isinstance(label, dict):  # a localisation dataset: its boxes follow the view
                hw = tf.cond(fused, lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
                             lambda: tf.shape(image)[:2])
                label = dict(label, boxes=box_views.train_boxes(label["boxes"], hw[0], hw[1],
                                                                fused, seed, d))
            return pos, uid, image, fused, label

        def view(pos, uid, image, fused, label):
            return (pos, *preprocess.train_view(image, fused, example_seed(uid), d), label)

        ds = self.source.train_dataset(epoch, seed, offset, self.batch)
        ds = ds.map(preprocess.as_written(read), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors(log_warning=False)  # undecodable images only: counted below
        ds = ds.map(preprocess.as_written(view), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(self.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def _generate(self):
        while True:
            epoch, expected = self.state["epoch"], self.state["offset"]
            for pos, image, alpha, label in self._epoch(epoch, expected).as_numpy_iterator():
                self._note_gaps(epoch, expected, pos)
                expected = int(pos[-1]) + 1
                self.state = {"epoch": epoch, "offset": expected}
                batch = {"image": image}
                batch.update(label if isinstance(label, dict) else {"label": label})
                batch["label"] = batch["label"].astype(np.int32)
                if self.d.colour_pca:  # the colour shift runs on the device
                    batch["alpha"] = alpha
                yield batch
            self.state = {"epoch": epoch + 1, "offset": 0}

    def _note_gaps(self, epoch, expected, positions):
        want = np.arange(expected, int(positions[-1]) + 1)
        for p in np.setdiff1d(want, positions):
            path = self.source.key(epoch, int(p), self.seed, self.batch)
            self.skipped.append(path)
            log.warning("skipped an image that failed to decode: %s (%d skipped so far)",
                        path, len(self.skipped))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)
