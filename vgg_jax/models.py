"""One Flax module that builds any VGG configuration of Table 1 (the tables themselves,
names and layers, are vgg_jax.arch's and re-exported here).

Layer names follow the paper: `conv{block}_{i}` (1x1 convs of C count as convs too),
`lrn1`, `pool{block}`, `fc6`, `fc7`, `fc8`. Activations are NHWC; `fc6` reads pool5
flattened in (H, W, C) order, which is what makes dense evaluation a plain reshape of
fc6's kernel into a 7x7 conv (torch's (C, H, W) order is permuted once in convert.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vgg_jax import choices, conv
from vgg_jax.arch import (ALIASES, CONFIGS, LRN_PARAMS, MIN_SIZE, POOLS,  # noqa: F401 (API)
                          Layer, all_arch_names, bn_name, canonical_name, check_layer,
                          layer_names, layer_table, relu_name, resolve_arch, scaled,
                          tap_names, torchvision_index)
from vgg_jax.errors import UserError
from vgg_jax.initializers import bias_initializer, initializers
from vgg_jax.ops import (adaptive_avg_pool, adaptive_pool_matrix,  # noqa: F401 (API)
                         avg_pool, local_response_norm, mask_valid, max_pool)

# ----------------------------------------------------------------------------- layers

def conv_plan(arch: str, image_size: int | tuple[int, int], *, width: float = 1.0,
              impl: str = "auto", train: bool = False, in_channels: int = 3,
              backend: str | None = None, dtype=None,
              pool_ceil: bool = False, batch: int | None = None) -> dict[str, str]:
    """{conv layer: the implementation it runs with} for this input size, mode, compute
    dtype and `batch` (the images one call runs; None leaves out the rules that depend on
    it) (`pool_ceil`: the model's ceil-mode pools, which round odd sizes up)."""
    return {layer.name: conv.resolve_conv_impl(impl, backend, train=train, hw=hw, channels=cin,
                                               kernel=layer.kernel, dtype=dtype, batch=batch,
                                               out_channels=cout)
            for layer, hw, cin, cout in conv_inputs(arch, image_size, width=width,
                                                    in_channels=in_channels,
                                                    pool_ceil=pool_ceil)}


def conv_inputs(arch: str, image_size: int | tuple[int, int], *, width: float = 1.0,
                in_channels: int = 3, pool_ceil: bool = False):
    """[(conv Layer, its input map's (h, w), input channels, output channels)] in order."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    convs, channels = [], in_channels
    for layer in layer_table(arch):
        if layer.kind == "conv":
            convs.append((layer, (h, w), channels, scaled(layer.channels, width)))
            channels = convs[-1][3]
        elif layer.kind == "pool":
            h, w = ((h + 1) // 2, (w + 1) // 2) if pool_ceil else (h // 2, w // 2)
    return convs


def describe_plan(plan: dict[str, str]) -> str:
    """'im2col conv1_1-conv2_1, winograd conv2_2-conv5_3': runs of equal choices."""
    runs = []
    for name, impl in plan.items():
        if runs and runs[-1][0] == impl:
            runs[-1][2] = name
        else:
            runs.append([impl, name, name])
    return ", ".join(f"{i} {a}" + (f"-{b}" if b != a else "") for i, a, b in runs)


class Conv(nn.Module):
    """A stride-1 'same' conv with `kernel` (HWIO) and `bias` params, like nn.Conv, whose
    implementation can be chosen (see resolve_conv_impl)."""
    features: int
    kernel_size: int = 3
    impl: str = "auto"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: str = "zeros"  # initializers.bias_initializer

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", bias_initializer(self.bias_init, k * k * x.shape[-1]),
                          (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        return conv.conv_layer(x, kernel, self.impl, train=train) + bias


class FC(nn.Module):
    """A fully-connected layer (params `kernel` (in, out), `bias`, as nn.Dense) that can
    also run as a `window` x `window` VALID conv over a feature map (dense evaluation,
    Sec. 3.2): the kernel's rows are in (H, W, C) order, so the conv kernel is a reshape.

    `pool=(ph, pw)` (adaptive-pool matrices, out x in) takes an unpooled (N, h, w, C) map
    and computes fc(adaptive_avg_pool(x)) as x . (pool folded into the kernel): both are
    linear, so this is the same function, and when the map is smaller than the pool grid
    (fc6 of a 32x32 input: 1x1 -> 7x7) it is 49x fewer multiplies per image, forward and
    backward, than replicating the map and multiplying by the 25088-row kernel."""
    features: int
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.01)
    bias_init: str = "zeros"  # initializers.bias_initializer

    @nn.compact
    def __call__(self, x, window: int | None = None, pool=None):
        if pool is not None:
            cin = pool[0].shape[0] * pool[1].shape[0] * x.shape[-1]
        else:
            cin = x.shape[-1] * (window * window if window else 1)
        kernel = self.param("kernel", self.kernel_init, (cin, self.features), jnp.float32)
        bias = self.param("bias", bias_initializer(self.bias_init, cin), (self.features,),
                          jnp.float32)
        if pool is not None:  # folded in float32, then cast like the kernel itself
            ph, pw = (jnp.asarray(p, kernel.dtype) for p in pool)
            kernel = kernel.reshape(ph.shape[0], pw.shape[0], x.shape[-1], self.features)
            kernel = jnp.einsum("ih,jw,ijcf->hwcf", ph, pw, kernel).reshape(-1, self.features)
            x = x.reshape(x.shape[0], -1)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        if window is None:
            return jnp.dot(x, kernel) + bias
        kernel = kernel.reshape(window, window, x.shape[-1], self.features)
        return conv.conv2d(x, kernel, "xla", padding="VALID") + bias


# ----------------------------------------------------------------------------- the net

class VGG(nn.Module):
    """Any Table 1 configuration; build it with `create_model`.

    `apply(variables, images_nhwc, train=False)` -> logits (N, num_classes), float32
    (float64 when dtype is float64).
    `dense=True` runs fc6/fc7/fc8 as 7x7/1x1 convs over the whole image (Sec. 3.2) and
    returns the class score map (N, h, w, num_classes). `capture=('conv3_3', 'fc7')` sows
    those activations (after ReLU; pools after pooling; fc8 = logits) as the dict
    `intermediates['layers'][0]`: pass `mutable=['intermediates']` (or use `extract`).
    `valid=(N, 2)` (with dense=True) gives each image's true (height, width) inside a
    zero-padded batch: every layer's output is zeroed outside the valid region, so the
    valid part of the score map (`dense_valid_size`) equals the unpadded computation and
    images of many sizes share a few compiled shapes (`average_valid` averages it).
    """
    arch: str = "D"
    num_classes: int = 1000
    in_channels: int = 3
    width: float = 1.0
    fc_widths: Sequence[int] = (4096, 4096)
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    init_scheme: str = "kaiming"
    bias_init: str = "zeros"  # 'torch': PyTorch's default U(+-1/sqrt(fan_in))
    conv_impl: str = "auto"
    classifier_pool: int = 7  # pool5 -> adaptive average pool to this size -> fc6
    pool_ceil: bool = False   # Caffe's ceil-mode pools (see max_pool); torchvision floors
    include_top: bool = True  # False: the conv stack only; apply returns the pool5 map
    bn_momentum: float = 0.9  # Flax's momentum = 1 - torch's 0.1
    bn_epsilon: float = 1e-5
    # BatchNorm layers (bn3_1, ...) that normalise with their running statistics in
    # training too: frozen layers (optim.freeze) compute in training what they compute at
    # evaluation, as Keras' BatchNormalization with trainable=False does
    frozen_bn: Sequence[str] = ()
    # 'avg': every max-pool an average pool of the same window (Gatys et al.'s style-
    # transfer net; the weights are the same)
    pooling: str = "max"
    # the localisation net of Appendix A: fc8 predicts boxes (cx, cy, w, h) instead of class
    # scores, one shared by all classes ('scr') or one per class ('pcr'); apply returns
    # (N, K, 4), K = 1 or num_classes ((N, h, w, K, 4) dense)
    box_head: str = ""

    @nn.compact
    def __call__(self, x, train: bool = False, *, dense: bool = False,
                 capture: Sequence[str] = (), valid=None):
        letter, batch_norm = resolve_arch(self.arch)
        check_input(x.shape, self.in_channels, dense, self.classifier_pool, self.pool_ceil)
        if valid is not None and not dense:
            raise UserError("valid= (true image sizes in a padded batch) needs dense=True")
        names = tap_names(self.arch)
        bad = set(capture) - set(names if self.include_top else names[:-3])
        if bad:
            raise UserError(f"unknown layer(s) {sorted(bad)} for {self.arch}; "
                             f"valid: {', '.join(layer_names(self.arch))}, and reluX_Y / "
                             f"convX_Y_pre for each convX_Y")
        if self.pooling not in ("max", "avg") or (self.pooling == "avg" and self.pool_ceil):
            raise UserError(f"pooling={self.pooling!r} (pool_ceil={self.pool_ceil}): valid are "
                            f"'max', and 'avg' with floor-mode pools")
        conv_init, fc_init = initializers(self.init_scheme)
        captured = {}

        def keep(name, value):
            if name in capture:
                captured[name] = value

        x = x.astype(self.dtype)
        if valid is not None:
            valid = jnp.asarray(valid, jnp.int32)
            x = mask_valid(x, valid)
        for layer in layer_table(letter):
            if layer.kind == "conv":
                x = Conv(scaled(layer.channels, self.width), layer.kernel, self.conv_impl,
                         self.dtype, conv_init, self.bias_init, name=layer.name)(x, train)
                keep(layer.name + "_pre", x)
                if batch_norm:
                    frozen = bn_name(layer.name) in self.frozen_bn
                    x = nn.BatchNorm(use_running_average=not train or frozen,
                                     momentum=self.bn_momentum,
                                     epsilon=self.bn_epsilon, dtype=self.dtype,
                                     param_dtype=jnp.float32,
                                     name=bn_name(layer.name))(x)
                x = nn.relu(x)
            elif layer.kind == "lrn":  # across channels: zero stays zero
                x = local_response_norm(x, **LRN_PARAMS)
            elif self.pooling == "avg":  # Gatys et al. 2016: smoother images from the loss
                x = avg_pool(x)
                if valid is not None:
                    valid = valid // 2
            else:
                x = max_pool(x, self.pool_ceil)
                if valid is not None:  # as the pool: floor, or ceil
                    valid = (valid + 1) // 2 if self.pool_ceil else valid // 2
            if valid is not None and layer.kind != "lrn":
                x = mask_valid(x, valid)
            keep(layer.name, x)
            if layer.kind == "conv":
                keep(relu_name(layer.name), x)
        if not self.include_top:  # a backbone, as Keras' include_top=False
            x = x.astype(jnp.promote_types(self.dtype, jnp.float32))
            if captured:
                self.sow("intermediates", "layers", captured)
            return x

        window, pool, size = None, None, self.classifier_pool
        if dense:
            window = size
        elif x.shape[1] * x.shape[2] < size * size:  # fold the upsampling pool into fc6
            pool = adaptive_pool_matrix(x.shape[1], size), adaptive_pool_matrix(x.shape[2], size)
        else:
            x = adaptive_avg_pool(x, size).reshape(x.shape[0], -1)
        if valid is not None:  # fc6 is a size x size VALID conv in dense mode
            valid = valid - (size - 1)
        for name, features in zip(("fc6", "fc7"), self.fc_widths):
            x = nn.relu(FC(features, self.dtype, fc_init, self.bias_init,
                           name=name)(x, window, pool))
            window, pool = (1 if dense else None), None
            if valid is not None:
                x = mask_valid(x, valid)
            keep(name, x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = FC(box_outputs(self.box_head, self.num_classes) or self.num_classes, self.dtype,
               fc_init, self.bias_init, name="fc8")(x, window)
        if valid is not None:
            x = mask_valid(x, valid)
        x = x.astype(jnp.promote_types(self.dtype, jnp.float32))  # f32 (f64 for f64)
        if self.box_head:
            x = x.reshape(*x.shape[:-1], -1, 4)
        keep("fc8", x)
        if captured:
            self.sow("intermediates", "layers", captured)
        return x


def dense_valid_size(hw, classifier_pool: int = 7, pool_ceil: bool = False):
    """The valid (h, w) of the dense score map for input sizes `hw` (..., 2): five
    halving pools (floor, or ceil), then fc6's classifier_pool x classifier_pool VALID
    window."""
    if not pool_ceil:
        return hw // 2 ** POOLS - (classifier_pool - 1)
    for _ in range(POOLS):
        hw = (hw + 1) // 2
    return hw - (classifier_pool - 1)


def average_valid(scores, valid_out):
    """(N, K): the score map (N, h, w, K) averaged over each image's valid positions
    (`dense_valid_size`); the positions outside are zero after `valid=` masking."""
    count = (valid_out[:, 0] * valid_out[:, 1]).astype(scores.dtype)
    return scores.sum(axis=(1, 2)) / count[:, None]


def pool5_side(n: int, pool_ceil: bool = False) -> int:
    """A side of n pixels after the five 2x2 stride-2 max-pools (floor, or Caffe's ceil)."""
    for _ in range(POOLS):
        n = (n + 1) // 2 if pool_ceil else n // 2
    return n


def smallest_side(pool5: int, pool_ceil: bool = False) -> int:
    """The fewest pixels a side needs to leave `pool5` pixels after the five pools."""
    return next(n for n in range(1, 2 ** POOLS * pool5 + 1) if pool5_side(n, pool_ceil) >= pool5)


def check_input(shape, in_channels: int, dense: bool = False, classifier_pool: int = 7,
                pool_ceil: bool = False):
    if len(shape) != 4:
        raise UserError(f"expected NHWC images (N, H, W, C), got shape {tuple(shape)}")
    _, h, w, c = shape
    if c != in_channels:
        raise UserError(f"images have {c} channels but the model was built for "
                         f"in_channels={in_channels}")
    want = classifier_pool if dense else 1
    if min(pool5_side(h, pool_ceil), pool5_side(w, pool_ceil)) < want:
        need = smallest_side(want, pool_ceil)
        what = (f"dense evaluation needs pool5 to be at least {classifier_pool}x{classifier_pool}"
                if dense else "the five 2x2 max-pools need at least 1x1 left at pool5")
        mode = " with ceil-mode pools" if pool_ceil else ""
        raise UserError(f"input {h}x{w} is smaller than {need}x{need}{mode}: {what}")


def box_outputs(box_head: str, num_classes: int) -> int:
    """fc8's width for a box head (Appendix A): 4 for single-class regression (SCR), 4 per
    class for per-class regression (PCR); 0 for a classifier ('')."""
    if box_head not in choices.BOX_HEADS:
        raise UserError(f"box_head={box_head!r}: valid are '' (a classifier), 'scr' (one box "
                        f"for all classes) and 'pcr' (a box per class)")
    return {"": 0, "scr": 4, "pcr": 4 * num_classes}[box_head]


def create_model(arch: str = "vgg16", *, num_classes: int = 1000, in_channels: int = 3,
                 width: float = 1.0, fc_widths: Sequence[int] = (4096, 4096),
                 dropout_rate: float = 0.5, dtype: Any = jnp.float32, init_scheme: str = "kaiming",
                 conv_impl: str = "auto", classifier_pool: int = 7,
                 pool_ceil: bool = False, include_top: bool = True,
                 pooling: str = "max", box_head: str = "", bias_init: str = "zeros") -> VGG:
    """Build a VGG. `arch`: paper letter (A, A-LRN, B, C, D, E, and Sec. 4.1's B-5x5) or
    vgg11, vgg11_lrn, vgg13, vgg16_c, vgg16, vgg19, vgg13_5x5, each optionally with `_bn`
    (BatchNorm after every conv). `pool_ceil`: Caffe's ceil-mode pools (dense evaluation
    of the original Caffe weights at sizes not divisible by 32; torchvision floors).
    `include_top=False`: the conv stack only, ending at pool5 (`apply` returns the
    (N, h, w, 512 x width) map), as Keras' include_top=False; no fc6-fc8 params.
    `width` multiplies every conv's channel count (the d2l seed uses 0.25); `fc_widths`
    sets fc6/fc7; `dtype` is the compute dtype (params stay float32). `pooling='avg'`:
    average pools in place of the max-pools (Gatys et al.'s loss network). `box_head`
    'scr' or 'pcr': the localisation net of Appendix A, whose fc8 predicts boxes
    (`apply` -> (N, 1 or num_classes, 4), each (cx, cy, w, h) as fractions of the input;
    vgg_jax.boxes). `bias_init`: 'zeros' (the paper's) or 'torch' (PyTorch's layers'
    default, `initializers.bias_initializer`)."""
    resolve_arch(arch)
    if not (isinstance(width, (int, float)) and 0 < width <= 16):
        raise UserError(f"width must be a number in (0, 16], got {width!r}")
    if num_classes < 1 or in_channels < 1:
        raise UserError(f"num_classes and in_channels must be >= 1, got "
                         f"{num_classes} and {in_channels}")
    if len(fc_widths) != 2 or min(fc_widths) < 1:
        raise UserError(f"fc_widths must be two positive sizes (fc6, fc7), got {fc_widths}")
    if not 0 <= dropout_rate < 1:
        raise UserError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    initializers(init_scheme)
    bias_initializer(bias_init, 1)
    conv.resolve_conv_impl(conv_impl)
    box_outputs(box_head, num_classes)
    if box_head and not include_top:
        raise UserError(f"box_head={box_head!r} needs the fully-connected layers "
                        f"(include_top=True)")
    return VGG(arch=canonical_name(arch), num_classes=num_classes, in_channels=in_channels,
               width=float(width), fc_widths=tuple(int(f) for f in fc_widths),
               dropout_rate=dropout_rate, dtype=jnp.dtype(dtype), init_scheme=init_scheme,
               conv_impl=conv_impl, classifier_pool=classifier_pool, pool_ceil=bool(pool_ceil),
               include_top=bool(include_top), pooling=pooling, box_head=box_head,
               bias_init=bias_init)


def init_variables(model: VGG, rng, image_size: int = 224):
    """Variables ({'params'[, 'batch_stats']}) for `model`, built at `image_size`. Jitted:
    XLA drops init's forward pass and draws each weight in place, so VGG-16's 138M
    parameters need no second copy of temporaries (and init takes a fraction of the time
    of running the net eagerly). Inside a caller's jit (train.py's state) it is traced
    into that; the values are the same either way."""
    shape = (1, image_size, image_size, model.in_channels)
    if isinstance(rng, jax.core.Tracer):
        return _init(model, shape, rng)
    return _jitted_init(model, shape)(rng)


def _init(model: VGG, shape, rng):
    """model.init, its weights drawn with JAX's non-partitionable threefry. Init draws
    each weight replicated, so partitioning buys nothing here, and XLA:CPU compiles the
    non-partitionable form ~4x faster (a width-1/16 VGG-19's init: 22.6 -> 5.2 s of CPU;
    bench/RESULTS.md, 2026-11-29). Same distributions; other draws than before that day."""
    with jax.threefry_partitionable(False):
        return model.init({"params": rng}, jnp.zeros(shape, jnp.float32), train=False)


@functools.lru_cache(maxsize=32)
def _jitted_init(model: VGG, shape):
    return jax.jit(functools.partial(_init, model, shape),
                   compiler_options=conv.init_compiler_options())


def abstract_variables(model: VGG, image_size: int = 224):
    """Shapes and dtypes of the variables, without allocating them (jax.eval_shape)."""
    return jax.eval_shape(lambda r: init_variables(model, r, image_size), jax.random.key(0))


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def extract(model: VGG, variables, images, layers: Sequence[str], *, dense: bool = False):
    """Named activations {layer: array} for `images` (eval mode)."""
    _, state = model.apply(variables, images, train=False, dense=dense, capture=tuple(layers),
                           mutable=["intermediates"])
    return dict(state["intermediates"]["layers"][0])
