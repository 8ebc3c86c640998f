"""A trained net, on disk and in memory: everything that finds, reads, describes or runs
a set of weights (the trainer only writes them).

A weights reference is a weights directory (vgg_jax.store: DIR/variables + DIR/meta.json,
`model_meta`), a training workdir (its latest or best checkpoint) or published weights by
name (vgg_jax.published); `resolve` turns any of them into a directory and `load_weights`
into variables and meta, for every command and `train.init_from` alike. `Net` is a loaded
net: its model, variables (replicated on this process's devices), pixel convention and
class names, with the forwards that predict, evaluate, embed, saliency and the plots use.
Initialising a new model from weights (fine-tuning, the paper's pre-initialisation of
Sec. 3.1) is here too: `adopt_init_from`, `paper_preinit_layers`, `load_layers`.
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from vgg_jax import (checkpoint, classes, conv, mesh, models, pixels, preprocess, published,
                     storage, store, views)
from vgg_jax.errors import NotFound, UserError


log = logging.getLogger(__name__)
MODEL_FIELDS_FROM_INIT = ("arch", "width", "fc_widths", "classifier_pool")


# ----------------------------------------------------------------------------- references

save_weights = store.save_weights  # the on-disk format is store's; kept here for callers


def resolve(ref: str) -> str:
    """The local directory a weights reference means: a weights directory or training
    workdir as given, or, for published weights by name (`torchvision:vgg16`,
    `keras:vgg19`, a bare torchvision name such as `vgg16` where no such path exists), the
    cached weights directory, fetched, verified and converted on first use
    (vgg_jax.published). The one place a reference is turned into a directory."""
    if published.is_name(ref):
        return published.weights_dir(ref)
    return ref


def read_meta(path: str) -> dict:
    """meta.json of a weights directory or training workdir (or published weights by
    name), without loading weights."""
    path = storage.absolute(resolve(path))
    if not store.has_meta(path):
        raise NotFound(
            f"{path} has no meta.json: expected a weights directory (written by `vgg-jax "
            f"convert` or training) or a training workdir")
    return store.read_meta(path)


def load_weights(path: str, which: str = "latest"):
    """(variables, meta) from a weights directory or a training workdir (`which`:
    'latest' or 'best' checkpoint of a workdir); `path` may name published weights
    (torchvision:vgg16, keras:vgg19: vgg_jax.published)."""
    path = storage.absolute(resolve(path))
    storage.check_reachable(path)
    if store.is_weights_dir(path):
        return store.read_variables(path), store.read_meta(path)
    if storage.isdir(storage.join(path, "checkpoints")):
        meta = read_meta(path)
        step, state = checkpoint.restore_params(path, which)
        variables = {"params": state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        return variables, dict(meta, step=int(step))
    raise NotFound(
        f"{path} is neither a weights directory (meta.json + variables/, written by "
        f"`vgg-jax convert` or training) nor a training workdir (checkpoints/)")


def pretrained(name: str):
    """(model, variables, meta) of weights by reference: published weights by name
    (pretrained('vgg16'), pretrained('keras:vgg19'); meta['published'] records the source,
    URL, hash and the publisher's accuracy), a weights directory or a training workdir."""
    variables, meta = load_weights(name)
    return model_from_meta(meta), variables, meta


def model_from_meta(meta: dict, **overrides) -> models.VGG:
    """The VGG module described by a weights directory's meta.json. The conv algorithm is
    this machine's choice ('auto' unless overridden), not the trainer's: meta.json written
    before 2026-11-29 recorded the training machine's `conv_impl`, which is ignored."""
    model = {k: v for k, v in meta["model"].items() if k != "conv_impl"}
    return models.create_model(**dict(model, **overrides))


def model_meta(model: models.VGG, data: ml_collections.ConfigDict, class_names) -> dict:
    """What a weights directory / workdir records about the model and its inputs
    (`data`: config.data)."""
    meta = dict(
        model=dict(arch=model.arch, num_classes=model.num_classes,
                   in_channels=model.in_channels, width=model.width,
                   fc_widths=list(model.fc_widths), dropout_rate=model.dropout_rate,
                   init_scheme=model.init_scheme,
                   classifier_pool=model.classifier_pool, pool_ceil=model.pool_ceil,
                   include_top=model.include_top,
                   **({"box_head": model.box_head} if model.box_head else {})),
        preprocessing=dict(
            preprocess.normalization(data.normalization, data.mean, data.std, data.bgr),
            recipe=data.recipe, image_size=data.image_size, eval_scale=data.eval_scale,
            s_min=data.s_min, s_max=data.s_max, channels=data.channels,
            flip=bool(data.flip)),
        class_names=list(class_names))
    described = classes.descriptions(class_names)  # ImageNet synsets -> readable names
    if described:
        meta["class_descriptions"] = described
    return meta


def data_config(meta: dict) -> ml_collections.ConfigDict:
    """The eval-time fields of config.data, rebuilt from a weights directory's meta."""
    p = meta["preprocessing"]
    return ml_collections.ConfigDict(dict(
        normalization="custom", mean=tuple(p["mean"]), std=tuple(p["std"]), bgr=p["bgr"],
        recipe=p["recipe"], image_size=p["image_size"], eval_scale=p["eval_scale"],
        s_min=p.get("s_min"), s_max=p.get("s_max"), channels=p["channels"],
        # weights in torchvision's convention were fed Pillow's decoding and resizing
        resampling="pil" if p.get("convention") == "torchvision" else "tf"))


# ----------------------------------------------------------------------------- init_from

def adopt_init_from(config) -> None:
    """Fine-tuning conveniences: model.arch='from_init' takes the architecture (arch,
    width, fc_widths, classifier_pool) of train.init_from's weights, and
    data.normalization='from_init' the pixel convention they were trained with, so a
    fine-tuning config need not restate them. Edits `config` in place."""
    m, d, t = config.model, config.data, config.train
    if m.arch != "from_init" and d.normalization != "from_init":
        return
    if not t.init_from:
        raise UserError("model.arch / data.normalization = 'from_init' need "
                        "train.init_from (a weights directory or training workdir)")
    meta = read_meta(t.init_from)
    if m.arch == "from_init":
        for key in MODEL_FIELDS_FROM_INIT:
            value = meta["model"].get(key, getattr(m, key))
            setattr(m, key, tuple(value) if isinstance(value, list) else value)
    if d.normalization == "from_init":
        p = meta["preprocessing"]
        d.update(normalization="custom", mean=tuple(p["mean"]), std=tuple(p["std"]),
                 bgr=bool(p["bgr"]))


def paper_preinit_layers(source_arch: str) -> list[str]:
    """Sec. 3.1: the first four conv layers and the three FC layers of net A, matched by
    name (A's conv1_1, conv2_1, conv3_1, conv3_2 have the same shapes in B..E)."""
    convs = [l.name for l in models.layer_table(source_arch) if l.kind == "conv"]
    return convs[:4] + ["fc6", "fc7", "fc8"]


def load_layers(params, batch_stats, source_variables, layers, exclude=(), strict=True):
    """Copy the named layers (and their BN) from source_variables. A named layer that is
    missing from the source, or (with `strict`) from the model, or has another shape is an
    error naming it (and both shapes); without `strict` a layer the model lacks is passed
    over (the caller reports it)."""
    src_p = source_variables["params"]
    src_bs = source_variables.get("batch_stats", {})
    params, batch_stats = dict(params), dict(batch_stats)
    loaded = []
    for name in layers:
        if name in exclude:
            continue
        if name not in params:
            if strict:
                raise UserError(f"train.init_from_layers names {name!r}, which this model "
                                f"does not have (its layers: "
                                f"{', '.join(k for k in params if not k.startswith('bn'))})")
            continue
        for tree, src in ((params, src_p), (batch_stats, src_bs)):
            for key in (name, models.bn_name(name)) if name.startswith("conv") else (name,):
                if key not in tree:
                    continue
                if key not in src:
                    if key == name and tree is params:
                        raise UserError(f"init_from has no layer {key!r}")
                    continue
                bad = [f"{key}/{leaf}: checkpoint shape {np.shape(src[key][leaf])} != model "
                       f"shape {np.shape(value)}" for leaf, value in sorted(tree[key].items())
                       if np.shape(src[key][leaf]) != np.shape(value)]
                if bad:  # every mismatching leaf (kernel and bias), in a fixed order
                    raise UserError(f"init_from layer {'; '.join(bad)} (exclude it with "
                                    f"train.init_exclude)")
                tree[key] = jax.tree.map(jnp.asarray, dict(src[key]))
                loaded.append(key)
    return params, batch_stats, loaded


def init_layers(params, batch_stats, train_cfg):
    """(params, batch_stats) with the layers train_cfg.init_from_layers ('all', 'paper'
    or names) of train_cfg.init_from's weights copied in, minus train_cfg.init_exclude."""
    variables, meta = load_weights(train_cfg.init_from)
    if train_cfg.init_from_layers == "paper":
        layers = paper_preinit_layers(meta["model"]["arch"])
    elif train_cfg.init_from_layers == "all":
        layers = [k for k in variables["params"] if not k.startswith("bn")]
    else:
        layers = names(train_cfg.init_from_layers)
    exclude = names(train_cfg.init_exclude)
    params, batch_stats, loaded = load_layers(params, batch_stats, variables, layers, exclude,
                                              strict=train_cfg.init_from_layers != "all")
    log.info("initialised %s from %s", ", ".join(dict.fromkeys(loaded)), train_cfg.init_from)
    unused = [k for k in layers if k not in params and k not in exclude]
    fresh = [k for k in params if not k.startswith("bn") and k not in loaded]
    if unused:  # 'all' from a deeper net (E into D): say which weights were left behind
        log.warning("init_from %s: its layers %s have no place in this model and were not "
                    "loaded", train_cfg.init_from, ", ".join(unused))
    if fresh:
        log.warning("init_from %s: this model's layers %s start from their initialiser",
                    train_cfg.init_from, ", ".join(fresh))
    return params, batch_stats


def names(value) -> tuple[str, ...]:
    """A config list of names: a tuple of names, or names separated by commas (a string,
    or the one-element tuple `--config.train.init_exclude=fc8,fc7` gives)."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(x.strip() for item in items for x in str(item).split(",") if x.strip())


# ----------------------------------------------------------------------------- in memory

def read_image_bytes(path: str) -> bytes:
    """The bytes of an image file, refused in one line when missing or undecodable."""
    if not os.path.isfile(path):
        raise NotFound(f"image file {path} does not exist" if not os.path.exists(path) else
                       f"{path} is not an image file (a directory?)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tf.io.decode_image(raw, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise UserError(f"cannot decode image {path}: {e.message.splitlines()[0]}") from None
    return raw


@functools.lru_cache(maxsize=None)
def _softmax_fn(model: models.VGG, dense: bool, normalise: pixels.Pixels):
    """One jitted posterior function per (model, mode, pixel convention), shared by every
    Net with that architecture (the variables are an argument), so fusion compiles
    nothing twice. It takes uint8 views and normalises them on the device."""

    def run(variables, images, valid):
        images = normalise(images)  # padding becomes -mean/std: the model masks it
        if dense:
            scores = model.apply(variables, images, train=False, dense=True, valid=valid)
            logits = models.average_valid(
                scores, models.dense_valid_size(valid, model.classifier_pool, model.pool_ceil))
        else:
            logits = model.apply(variables, images, train=False)
        return jax.nn.softmax(logits)

    return conv.jit_eval(run)


@functools.lru_cache(maxsize=None)
def _dense_feature_fn(model: models.VGG, layer: str, normalise: pixels.Pixels):
    """Jitted (variables, uint8 images, valid) -> (N, D): `layer` (fc6 or fc7) of the
    fully-convolutional net, averaged over each image's valid positions."""

    def run(variables, images, valid):
        _, state = model.apply(variables, normalise(images), train=False, dense=True,
                               valid=valid, capture=(layer,), mutable=("intermediates",))
        fmap = state["intermediates"]["layers"][0][layer].astype(jnp.float32)
        return models.average_valid(fmap, models.dense_valid_size(
            valid, model.classifier_pool, model.pool_ceil))

    return conv.jit_eval(run)


@functools.lru_cache(maxsize=None)
def _dense_map_fn(model: models.VGG, normalise: pixels.Pixels):
    """Jitted (variables, uint8 images, valid) -> the fully-convolutional net's raw output
    map: class scores (N, h, w, K), or a box net's boxes (N, h, w, K, 4); positions
    outside each image's valid map are zero."""

    def run(variables, images, valid):
        return model.apply(variables, normalise(images), train=False, dense=True, valid=valid)

    return conv.jit_eval(run)


class Net:
    """One set of weights (a directory or workdir, or model + variables + meta), with its
    preprocessing (`d`: config.data's eval fields; `normalise`: on the device), class
    names, and forwards: batched posteriors sharded over this process's devices (crops,
    or zero-padded whole images with their valid sizes for dense evaluation), and per-file
    helpers (pixels, image, probabilities, top, features)."""

    def __init__(self, weights: str | None = None, *, model=None, variables=None, meta=None,
                 devices=None):
        if weights is not None:
            variables, meta = load_weights(weights)
            model = model_from_meta(meta)
        self.meta, self.model = meta, model
        self.d = data_config(meta)
        # test-time flips as at training (weights from before this was recorded: flipped,
        # the paper's and torchvision's recipe)
        self.flip = bool(meta["preprocessing"].get("flip", True))
        self.normalise = pixels.for_data(self.d)
        self.class_names = meta.get("class_names") or [str(i) for i in range(model.num_classes)]
        self.display_names = classes.display_names(meta, model.num_classes)
        _, self._sharded, replicated = mesh.data_mesh(devices or jax.local_devices())
        self.num_devices = len(self._sharded.mesh.devices.flat)
        self.variables = jax.device_put(variables, replicated)
        self._normalise = jax.jit(self.normalise)
        apply = lambda v, x, **kw: model.apply(v, self.normalise(x), **kw)
        self._apply = conv.jit_eval(apply, static_argnames=("train", "dense", "capture",
                                                            "mutable"))

    def require_classifier(self) -> "Net":
        """This net, or one line saying that a box net (Appendix A) has no class scores."""
        if self.model.box_head:
            raise UserError(f"these weights are a localisation net (model.box_head="
                            f"{self.model.box_head!r}): they predict boxes, not class scores; "
                            f"train.py validates them (the centre-crop box of the true class)")
        return self

    # -- batches of uint8 arrays

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """The raw outputs of a batch of uint8 crops whose size divides over the devices:
        class scores (N, K), or a box net's boxes (N, K, 4)."""
        put = jax.device_put(images, self._sharded)
        return np.asarray(self._apply(self.variables, put, train=False))

    def posteriors(self, images: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Soft-max posteriors (N, K) of a batch of uint8 images whose size divides over
        the devices; with `valid` (N, 2) the batch is zero-padded whole images (dense)."""
        dense = valid is not None
        if dense:
            self.check_dense_views(valid)
        valid = np.asarray(valid if dense else np.zeros((len(images), 2)), np.int32)
        fn = _softmax_fn(self.model, dense, self.normalise)
        put = lambda x: jax.device_put(x, self._sharded)
        return np.asarray(fn(self.variables, put(images), put(valid)))

    def dense_features(self, images: np.ndarray, valid: np.ndarray, layer: str = "fc7",
                       batch: int | None = None) -> np.ndarray:
        """(N, D): `layer`'s (fc6 or fc7) map of the fully-convolutional net, averaged over
        each image's valid positions, for zero-padded uint8 images with true sizes `valid`
        (N, 2) (Appendix B's descriptors are built from these)."""
        if layer not in ("fc6", "fc7"):
            raise UserError(f"dense features come from fc6 or fc7, not {layer!r}")
        n = len(images)
        self.check_dense_views(valid)
        images, valid = self._padded(images, valid, batch)
        fn = _dense_feature_fn(self.model, layer, self.normalise)
        put = lambda x: jax.device_put(x, self._sharded)
        return np.asarray(fn(self.variables, put(images), put(np.asarray(valid, np.int32))))[:n]

    def dense_map(self, image: np.ndarray) -> np.ndarray:
        """The raw output map of one whole uint8 image (H, W, C) through the
        fully-convolutional net (Sec. 3.2): class scores (h, w, K), or a box net's boxes
        (h, w, K, 4), one per valid position; the image is zero-padded to a multiple of 32
        (and the batch to the devices) so that images of near sizes share a compilation."""
        valid = np.array([image.shape[:2]], np.int32)
        self.check_dense_views(valid)
        padded, size = views.dense_view(image)
        images, valid_b = self._padded(padded[None], valid, None)
        fn = _dense_map_fn(self.model, self.normalise)
        put = lambda x: jax.device_put(x, self._sharded)
        out = np.asarray(fn(self.variables, put(images), put(np.asarray(valid_b, np.int32))))[0]
        h, w = models.dense_valid_size(np.asarray(size), self.model.classifier_pool,
                                       self.model.pool_ceil)
        return out[:h, :w]

    def smallest_dense_q(self) -> int:
        """The smallest test scale Q (shorter side) whose dense view leaves fc6 its
        classifier_pool x classifier_pool window of pool5."""
        return models.smallest_side(self.model.classifier_pool, self.model.pool_ceil)

    def check_dense_views(self, valid) -> None:
        """Refuse views too small for the fully-convolutional net, in one line naming the
        smallest Q (below it fc6's window does not fit and the scores would be empty)."""
        m = self.model
        for h, w in np.asarray(valid).reshape(-1, 2):
            ph, pw = models.pool5_side(int(h), m.pool_ceil), models.pool5_side(int(w), m.pool_ceil)
            if min(ph, pw) < m.classifier_pool:
                raise UserError(
                    f"a {h}x{w} view is too small for dense evaluation: this net's fc6 needs "
                    f"a {m.classifier_pool}x{m.classifier_pool} window of pool5 (the view "
                    f"leaves {ph}x{pw}); the smallest test scale Q for it is "
                    f"{self.smallest_dense_q()}")

    def _padded(self, images, valid, batch: int | None):
        """The batch padded with empty views to `batch` or to a multiple of the devices."""
        n = len(images)
        size = batch or -(-n // self.num_devices) * self.num_devices
        if size > n:
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]),
                                                      images.dtype)])
            if valid is not None:  # empty views are 'valid' on their whole padded size
                fill = np.tile([[images.shape[1], images.shape[2]]], (size - n, 1))
                valid = np.concatenate([valid, fill])
        return images, valid

    def padded_posteriors(self, images, valid=None, batch: int | None = None):
        """`posteriors` of `images` padded (with empty views) to `batch` or to a multiple
        of the devices; returns the rows of the real views."""
        n = len(images)
        return self.posteriors(*self._padded(images, valid, batch))[:n]

    def softmax(self, images):
        """Posteriors of standard (crop) inputs, any batch size."""
        return self.padded_posteriors(np.asarray(images))

    def logits(self, images, dense: bool = False):
        """Logits of uint8 images, normalised on the device."""
        return self._apply(self.variables, jnp.asarray(images), train=False, dense=dense)

    # -- image files

    def pixels(self, path: str, *, scale=None, crop=True) -> np.ndarray:
        """The uint8 pixels the device gets for an image file (decoded, rescaled, cropped)."""
        raw = read_image_bytes(path)
        return preprocess.eval_example(tf.constant(raw), self.d, scale=scale, crop=crop).numpy()

    def image(self, path: str, *, scale=None, crop=True) -> np.ndarray:
        """The normalised float image the network sees (for saliency, activations)."""
        return np.asarray(self._normalise(self.pixels(path, scale=scale, crop=crop)[None])[0])

    def probabilities(self, path: str, *, dense: bool = False, q: int = 256) -> np.ndarray:
        """Soft-max of one image file: the centre crop, or with `dense` the class score map
        of the whole image at scale Q averaged spatially (Sec. 3.2, without the flip)."""
        if dense:
            return views.posterior(self, read_image_bytes(path), "dense", [q], flip=False)
        return self.softmax(self.pixels(path)[None])[0]

    def top(self, path: str, k: int = 5, **kw) -> list[tuple[str, float]]:
        p = self.probabilities(path, **kw)
        order = np.argsort(-p)[:k]
        return [(self.display_names[i], float(p[i])) for i in order]

    def features(self, paths, layer: str) -> np.ndarray:
        images = np.stack([self.pixels(p) for p in paths])
        _, state = self._apply(self.variables, jnp.asarray(images), train=False,
                               capture=(layer,), mutable=("intermediates",))
        return np.asarray(state["intermediates"]["layers"][0][layer])
