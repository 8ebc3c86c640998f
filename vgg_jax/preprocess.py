"""The paper's image preprocessing as small tf ops (Sec. 3.1 training, Sec. 3.2 testing).

Every random op is stateless and takes an explicit seed, so a batch is a pure function of
(config seed, epoch, example position): the same run gives the same batches, and a resumed
run gives the batches the interrupted one would have.
"""
from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

from vgg_jax import choices
from vgg_jax.errors import UserError, check_choice


# Sec. 2.1: the mean RGB of the ImageNet training set, on 0..255 pixels.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
# torchvision's eval transform: mean/std on [0, 1] pixels, expressed here on 0..255.
TORCHVISION_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
TORCHVISION_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))
# Krizhevsky et al. 2012 colour shift: PCA of ImageNet RGB on [0, 1] (fb.resnet.torch).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))  # columns are the eigenvectors

# Pixel conventions: out = (pixel_0_255 - mean) / std, then RGB->BGR if bgr.
NORMALIZATIONS = {
    "paper": dict(mean=IMAGENET_MEAN_RGB, std=(1.0, 1.0, 1.0), bgr=False),
    "torchvision": dict(mean=TORCHVISION_MEAN, std=TORCHVISION_STD, bgr=False),
    # The released Caffe VGG weights: BGR, mean [103.939, 116.779, 123.68] (Keras 'caffe').
    "caffe": dict(mean=IMAGENET_MEAN_RGB, std=(1.0, 1.0, 1.0), bgr=True),
    "unit": dict(mean=(127.5,), std=(127.5,), bgr=False),  # [-1, 1]; small datasets
}
assert tuple(NORMALIZATIONS) == choices.NORMALIZATIONS  # the names are listed in choices


def as_written(fn):
    """`fn` for tf.data (map, flat_map), traced as written. tf.data otherwise runs
    autograph over the function and every function it calls, rewriting their source, which
    took 2.8 s of each command's start on 2026-12-07 (2-core AMD EPYC); the pipeline's
    functions branch on tensors with tf.cond and tf.where only, so there is nothing to
    rewrite (a Python `if` on a tensor fails loudly at trace time)."""
    return tf.autograph.experimental.do_not_convert(fn)


def normalization(name: str, mean=None, std=None, bgr: bool = False) -> dict:
    """A preset by name, or 'custom' with explicit mean/std (0..255 pixel units)."""
    if name == "custom":
        if mean is None or std is None:
            raise UserError("normalization 'custom' needs data.mean and data.std (0..255 units)")
        return dict(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                    bgr=bool(bgr))
    check_choice("normalization", name, (*choices.NORMALIZATIONS, "custom"))
    return dict(NORMALIZATIONS[name])


def seeds(seed, n: int):
    """n independent stateless seeds from one ([2] int) seed."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def decode(image_bytes, channels: int):
    return tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)


def rescaled_size(h, w, s):
    """Isotropic rescale so the smallest side is exactly S (torchvision's rounding:
    the long side is int(S * long / short))."""
    h, w, s = tf.cast(h, tf.float32), tf.cast(w, tf.float32), tf.cast(s, tf.float32)
    short = tf.minimum(h, w)
    nh = tf.where(h <= w, s, tf.floor(s * h / short))
    nw = tf.where(h <= w, tf.floor(s * w / short), s)
    return tf.cast(nh, tf.int32), tf.cast(nw, tf.int32)


def rescale(image, s, antialias: bool = True):
    """Float32 image whose smallest side is S (bilinear; antialiased when shrinking, as
    PIL / torchvision's eval transform, unless antialias=False)."""
    shape = tf.shape(image)
    nh, nw = rescaled_size(shape[0], shape[1], s)
    return tf.image.resize(tf.cast(image, tf.float32), (nh, nw), method="bilinear",
                           antialias=antialias)


def sample_scale(seed, s_min: int, s_max: int):
    """Sec. 3.1 scale jittering: S ~ U{S_min..S_max} per image (S_min == S_max: fixed S)."""
    if s_min == s_max:
        return tf.constant(s_min, tf.int32)
    return tf.random.stateless_uniform([], seed, s_min, s_max + 1, dtype=tf.int32)


def crop_offset(height, width, size, seed, size_w=None):
    """(top, left) of a random size x size (or size x size_w) crop of a (height, width)
    image: the offset tf.image.stateless_random_crop draws for an (H, W, C) image, drawn
    here so that a box can follow the crop (vgg_jax.box_views)."""
    size_w = size if size_w is None else size_w
    limit = tf.stack([height - size + 1, width - size_w + 1, 1])
    offset = tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32) % limit
    return offset[0], offset[1]


def random_crop(image, size: int, seed):
    """tf.image.stateless_random_crop's crop (the same pixels for the same seed)."""
    shape = tf.shape(image)
    top, left = crop_offset(shape[0], shape[1], size, seed)
    return image[top:top + size, left:left + size]


def center_crop(image, size: int):
    """torchvision's CenterCrop: offsets int(round((side - size) / 2)), Python's round,
    which takes halves to the even integer (a floor would be one pixel off whenever
    side - size = 3 mod 4); tf.math.round rounds halves to even too."""
    shape = tf.shape(image)
    top, left = center_offset(shape[0], size), center_offset(shape[1], size)
    return image[top:top + size, left:left + size]


def center_offset(side, size: int):
    """center_crop's offset along a side."""
    return tf.cast(tf.math.round(tf.cast(side - size, tf.float64) / 2.0), tf.int32)


def flipped(seed):
    """Whether tf.image.stateless_random_flip_left_right mirrors an image for `seed`."""
    return tf.random.stateless_uniform([], seed, 0, 1.0) < 0.5


def random_flip(image, seed):
    """tf.image.stateless_random_flip_left_right's flip (the same for the same seed)."""
    return tf.cond(flipped(seed), lambda: tf.reverse(image, [1]), lambda: image)


def pca_alpha(seed, alpha_std: float = 0.1):
    """The colour shift's three random coefficients alpha_i ~ N(0, alpha_std^2)."""
    return tf.random.stateless_normal([3], seed) * alpha_std


def to_uint8(image):
    """Round a resized (float) image back to 0..255 pixels, as PIL-based pipelines do."""
    if image.dtype == tf.uint8:
        return image
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def pad_and_random_crop(image, pad: int, seed):
    """CIFAR-style: zero-pad `pad` pixels each side, crop back to the original size."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    top, left = crop_offset(shape[0] + 2 * pad, shape[1] + 2 * pad, shape[0], seed, shape[1])
    return padded[top:top + shape[0], left:left + shape[1]]


def resize_to(image, size: int):
    image = tf.cast(image, tf.float32)
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return tf.image.resize(image, (size, size), method="bilinear", antialias=True)


def fused_jpeg_window(image_bytes, channels: int, s, size: int, seed):
    """The window of the *encoded* JPEG that rescale-to-S then a random size x size crop
    would show, decoded alone (tf.image.decode_and_crop_jpeg), not yet resized."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = jpeg_window(shape[0], shape[1], s, size, seed)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=channels)


def jpeg_window(h, w, s, size: int, seed):
    """(y, x, height, width) of fused_jpeg_window's window in an h x w JPEG."""
    scale = tf.cast(s, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    ch = tf.minimum(h, tf.cast(tf.round(size / scale), tf.int32))
    cw = tf.minimum(w, tf.cast(tf.round(size / scale), tf.int32))
    sy, sx = seeds(seed, 2)
    y = tf.random.stateless_uniform([], sy, 0, h - ch + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], sx, 0, w - cw + 1, dtype=tf.int32)
    return tf.stack([y, x, ch, cw])


def _window_to_crop(window, size: int, antialias: bool):
    return tf.image.resize(tf.cast(window, tf.float32), (size, size), method="bilinear",
                           antialias=antialias)


def fused_jpeg_scale_crop(image_bytes, channels: int, s, size: int, seed,
                          antialias: bool = False):
    """Rescale-to-S then random-crop, computed as one crop of the encoded JPEG resized to
    size x size."""
    return _window_to_crop(fused_jpeg_window(image_bytes, channels, s, size, seed), size,
                           antialias)


def train_decode(image_bytes, seed, d):
    """(uint8 image, fused): the step of Sec. 3.1's preprocessing that reads the file, the one
    a broken file fails (the pipeline skips and names such files; an error after it is a
    bug and is raised). The decoded image, or with data.fused_jpeg_crop (recipe 'paper')
    a JPEG's decoded crop window (`fused` True)."""
    s_scale, s_crop, _, _ = seeds(seed, 4)
    check_choice("data.recipe", d.recipe, choices.RECIPES)
    if d.recipe == "paper" and d.fused_jpeg_crop:
        s = sample_scale(s_scale, d.s_min, d.s_max)
        return tf.cond(
            tf.io.is_jpeg(image_bytes),
            lambda: (fused_jpeg_window(image_bytes, d.channels, s, d.image_size, s_crop),
                     tf.constant(True)),
            lambda: (decode(image_bytes, d.channels), tf.constant(False)))
    return decode(image_bytes, d.channels), tf.constant(False)


def train_view(image, fused, seed, d):
    """(uint8 image, alpha (3,)) of a decoded image (train_decode): Sec. 3.1 for recipe
    'paper' (rescale to S or S~[Smin,Smax], random crop, flip), or the seeds' small-image
    recipe 'small' (resize to the model input, pad-and-crop, flip); alpha holds the PCA
    colour shift's random coefficients (zeros without data.colour_pca). The shift and the
    mean subtraction run on the device (`pixels.Pixels`). `d` is config.data."""
    s_scale, s_crop, s_flip, s_pca = seeds(seed, 4)
    if d.recipe == "paper":
        s = sample_scale(s_scale, d.s_min, d.s_max)
        aa = d.get("antialias", False)
        crop = lambda: random_crop(rescale(image, s, aa), d.image_size, s_crop)
        if d.fused_jpeg_crop:
            image = tf.cond(fused, lambda: _window_to_crop(image, d.image_size, aa), crop)
        else:
            image = crop()
    else:  # 'small'
        image = resize_to(image, d.image_size)
        image.set_shape((d.image_size, d.image_size, d.channels))
        if d.pad:
            image = pad_and_random_crop(image, d.pad, s_crop)
    if d.flip:
        image = random_flip(image, s_flip)
    image = to_uint8(image)
    image.set_shape((d.image_size, d.image_size, d.channels))
    alpha = pca_alpha(s_pca, d.pca_std) if d.colour_pca else tf.zeros([3])
    return image, alpha


def train_example(image_bytes, seed, d):
    """train_view of train_decode: an encoded image's training example."""
    return train_view(*train_decode(image_bytes, seed, d), seed, d)


def test_scale(d) -> int:
    """Q when none is given: the crop size for the 'small' recipe (trained on images resized
    to it), else data.eval_scale (Sec. 3.2)."""
    return int(d.image_size if d.recipe == "small" else d.eval_scale)


def _pil_decode(image_bytes, channels: int) -> np.ndarray:
    from PIL import Image
    if isinstance(image_bytes, np.ndarray):  # tf.numpy_function's 0-d object array
        image_bytes = image_bytes.item()
    with Image.open(io.BytesIO(bytes(image_bytes))) as im:
        out = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return out.reshape(out.shape[0], out.shape[1], channels)


def _pil_rescale(image: np.ndarray, s) -> np.ndarray:
    """torchvision's `Resize(S)` of a PIL image: the long side int(S * long / short), PIL's
    antialiased bilinear filter, uint8."""
    from PIL import Image
    h, w, c = image.shape
    s = int(s)
    long = int(s * max(h, w) / min(h, w))
    size = (s, long) if w <= h else (long, s)  # PIL's (width, height)
    out = np.asarray(Image.fromarray(image[..., 0] if c == 1 else image).resize(size,
                                                                              Image.BILINEAR))
    return out.reshape(out.shape[0], out.shape[1], c)


def _pil(d) -> bool:
    return d.get("resampling", "tf") == "pil"


def eval_decode(image_bytes, d):
    """Encoded image -> uint8 (H, W, C): the one step of test-time preprocessing a broken
    file fails (the pipelines skip and name such files; an error after it is a bug and is
    raised). Pillow's decoder for weights in torchvision's convention (`d.resampling ==
    'pil'`), as torchvision's transforms get their images, else TensorFlow's."""
    if _pil(d):
        image = tf.numpy_function(lambda b: _pil_decode(b, d.channels), [image_bytes], tf.uint8)
        image.set_shape((None, None, d.channels))
        return image
    return decode(image_bytes, d.channels)


def eval_view(image, d, *, scale: int | None = None, crop: bool = True) -> tf.Tensor:
    """Sec. 3.2 as uint8 pixels, the one test-time view of a decoded image: rescale so the
    smallest side is Q (`scale`, default test_scale(d)), then torchvision's centre crop of
    data.image_size, or with crop=False the whole image (dense evaluation). evaluate,
    predict, embed and training-time validation all take their centre crop here. Weights in
    torchvision's convention are resized by Pillow as torchvision does, others by
    TensorFlow's antialiased bilinear. The normalisation runs on the device
    (`pixels.Pixels`)."""
    s = tf.cast(scale or test_scale(d), tf.int32)
    if _pil(d):
        image = tf.numpy_function(_pil_rescale, [image, s], tf.uint8)
        image.set_shape((None, None, d.channels))
    else:
        image = rescale(image, s)
    if crop:
        image = center_crop(image, d.image_size)
    return to_uint8(image)


def eval_example(image_bytes, d, *, scale: int | None = None, crop: bool = True) -> tf.Tensor:
    """eval_view of eval_decode: an encoded image's test-time view."""
    return eval_view(eval_decode(image_bytes, d), d, scale=scale, crop=crop)
