"""Convolution algorithms for VGG's stride-1 'same' convs, and which one a layer runs.

On GPU/TPU every conv is XLA's own (cuDNN, the TPU's conv unit). XLA:CPU's convs are
slow, the backward especially, so on CPU `conv_impl='auto'` picks per layer among
XLA's conv (through YNNPACK for inference), im2col (the k*k shifted views stacked on the
channel axis, one matmul) and Winograd F(2x2, 3x3) / F(4x4, 3x3) (a JAX primitive with
written-out transposes, so jvp, grad and vmap all apply; run over chunks of the batch,
for memory). Each equals lax.conv_general_dilated to float rounding
(tests/test_conv_impl.py); bench/RESULTS.md has the measurements behind the thresholds.
`models.conv_plan` lists the choice per layer of a network.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from vgg_jax.choices import CONV_IMPLS
from vgg_jax.errors import check_choice
from vgg_jax.winograd import WINOGRAD_IMPLS, winograd_conv3x3

# XLA:CPU runs lax.conv through YNNPACK only when asked (jaxlib 0.10); with it, the 3x3
# convs of VGG at >= 4x4 maps run 2-5x faster than with Eigen or im2col (bench/RESULTS.md).
# The list replaces XLA's default one, so it keeps YNNPACK's dots on as well.
CPU_EVAL_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
# XLA:CPU's newer (MLIR) fusion emitters, on by default in jaxlib 0.10, took ~1 GB of
# memory to compile VGG-16's training step (32x32, b128), more than the step itself
# used, and the step ran ~8% slower with them than with the classic emitters
# (bench/RESULTS.md, 2026-11-28). LLVM's loop unrolling and SLP vectorizer, which XLA:CPU
# runs on every kernel, cost a quarter of the training step's compile (VGG-16 224 b16:
# 46-52 -> 34-40 s; an F(4x4) layer's forward + gradients 6.2-7.2 -> 4.1-4.2 s) and buy
# no speed (the step, inference at 224 the same within the spread; an F(2x2) layer at
# 32x32 b128 302-323 -> 238-245 ms; RESULTS, 2026-11-30). XLA:CPU's scheduler that
# orders a program for concurrent thunks kept more temporaries alive at once: VGG-16's
# step without it needs 1,469 instead of 1,776 MiB of them at 224 b16 (1,104 vs 1,278
# undonated; 307 vs 387 at 32x32 b128), the process peaks 180-300 MB lower, at the same
# speed (RESULTS, 2026-11-30). The YNNPACK list and the emitters are also per-computation
# options (CPU_TRAIN_OPTIONS, the library's own jits); the LLVM switches and the scheduler
# XLA takes only process-wide (XLA_FLAGS), so they are `runtime.configure_cpu()`'s alone.
CPU_TRAIN_OPTIONS = {**CPU_EVAL_OPTIONS, "xla_cpu_use_fusion_emitters": False}
CPU_PROCESS_OPTIONS = {**CPU_EVAL_OPTIONS, "xla_cpu_use_fusion_emitters": "false",
                       "xla_backend_extra_options":
                       "xla_cpu_disable_loop_unrolling,xla_cpu_disable_slp_vectorizer",
                       "xla_cpu_enable_concurrency_optimized_scheduler": "false"}
MIN_YNN_PIXELS = 16  # YNNPACK's conv is pathological on 2x2 maps (~2 GFLOP/s)
# Winograd (WINOGRAD) replaces a 3x3 conv's 9 multiplies per output by 2.25 (F(2x2)) or
# 4 (F(4x4)) times fewer, at the cost of transforms per pixel and channel. Per-layer
# forward (+ both gradients in training) on the 2-core CPU, bench/RESULTS.md 2026-11-28:
# - training: F(2x2) is the fastest formulation tried for every VGG-16 layer from 4x4
#   maps with >= 64 input channels (conv1_2 at 32x32, b128: 178 ms; im2col 262, XLA's
#   conv 240; at 224, b16: 1129 vs im2col 1671), and for the narrow nets' 16-32 input
#   channels (d2l's VGG-11/4 at 64x64, b128, 2026-11-29: 32x32 16->32 99 ms vs im2col
#   124, 16x16 32->64 51 vs 61), except F(4x4) on 8x8-56x56 maps with >= 256 channels
#   (56x56x256, b16: 585 vs 728 ms, 2026-11-30). F(4x4) is also 1-29% faster on every
#   map of 8-224 pixels a side (multiples of 4) from 16 channels, but costs 2-3x F(2x2)'s
#   compile per layer: taken there, VGG-16's 32x32 step gained 3-10% for a first call
#   56-73% longer, its 224 step nothing measurable for 24% (bench/winograd_parts.py
#   --tables tiles; RESULTS 2026-11-30). im2col on 2x2 maps. From 3 to 15 input channels
#   (conv1_1 of RGB images) XLA's conv: the kernel gradient alone (what a first layer
#   needs; bench/winograd_parts.py, 2026-11-29, idle) of 224x224 3->64 b16 took 409 ms
#   against im2col's 657, 32x32 3->64 b128 74 vs 84; for one channel (d2l's grayscale
#   64x64 1->16 b128) im2col's 89 beat XLA's 112.
# - inference: YNNPACK's conv for large maps (224x224x64: 104 ms vs F(2x2) 225, b8) and
#   below 64 channels; F(2x2) on maps up to 64x64 from 64 channels (VGG-16 at 224 b8: 14.0
#   img/s vs 11.2 with YNNPACK from conv3_2 on, Intel, 2026-11-30; from 256 channels and
#   56x56 then. Lowered to 64 / 64x64 on 2026-12-07 on an AMD EPYC: VGG-16 at 32 b128
#   465 -> 590 img/s, LPIPS at 64 px 0.79x -> 0.96-1.12x the lpips package, 224 b8
#   unchanged within the noise, ~1-1.5 s more compile per small net's eval step;
#   bench/RESULTS.md). F(4x4) was as fast end to end but its
#   temporaries raised the peak memory by ~270 MB (1.72 vs 1.43 GB).
WINOGRAD_MIN_CHANNELS = 16
XLA_MIN_CHANNELS = 3  # training, below WINOGRAD_MIN_CHANNELS: XLA's conv from here, im2col below
WINOGRAD4_MIN_CHANNELS = 256
WINOGRAD4_SIDES = (8, 56)  # F(4x4) on maps whose sides are multiples of 4 in this range
EVAL_WINOGRAD_MIN_CHANNELS = 64  # inference: F(2x2) from these input channels ...
EVAL_WINOGRAD_MAX_SIDE = 64  # ... on maps of at most this many pixels per side
# A layer's work: batch x output pixels x Cin x Cout (its multiply-adds / 9). F(2x2) costs
# ~1-2.5 s more compile per layer than XLA's conv or im2col (forward + both gradients;
# ~1 s for a forward alone), which a short run of a small net never earns back, and its
# kernel-side transforms do not pay on few pixels. Measured per layer on an AVX2 AMD EPYC,
# 2026-12-07 (`bench/winograd_parts.py --tables small`, bench/RESULTS.md):
# - training: at ~1M of work (VGG-11 at 1/16 width on 32x32 digits, b16-b64) XLA's conv is
#   as fast as F(2x2) (2.49 vs 2.63 ms, 1.45 vs 1.59) and compiles in 0.1-0.2 s instead of
#   1.5-2.9; from ~4M F(2x2) is 4-45% faster than the best other. With many channels on
#   few pixels the transforms of the kernel and its gradient dominate: 4x4 512->512 at b16
#   (256 pixels) took 83 ms against im2col's 26, at b32 87 vs 49, 14x14 at b4 108 vs 87,
#   at b64 (1,024 pixels) 114 vs 117, at b128 161 vs 254; 8x8 256->256 at b8 (512 pixels)
#   12.8 vs 12.6, at b16 20.9 vs 30.2. So F(2x2) from TRAIN_WINOGRAD_MIN_WORK and
#   TRAIN_WINOGRAD_PIXELS_PER_CHANNEL x Cin pixels (batch x h x w), XLA's conv below the
#   work, im2col below the pixels.
# - inference: F(2x2) runs 1.2-2.5x faster than YNNPACK's conv from 64 channels at every
#   size measured above ~8M, but saves only 0-4 ms a call below ~60M (VGG-11/4's eval step
#   at b128: 7.95 vs 3.69, 4.30 vs 2.13, 4.16 vs 4.23 ms), against ~0.9 s more compile per
#   layer; from 2^26 it saves 5-50 ms (VGG-16 at 32x32 b128, at 224 from b1, LPIPS's trunk
#   at 64 px from b16; at b8 its conv5, at b1 all its layers take YNNPACK's conv).
TRAIN_WINOGRAD_MIN_WORK = 4_000_000
TRAIN_WINOGRAD_PIXELS_PER_CHANNEL = 2
EVAL_WINOGRAD_MIN_WORK = 1 << 26


def _fits_winograd4(hw, channels) -> bool:
    lo, hi = WINOGRAD4_SIDES
    return (channels is not None and channels >= WINOGRAD4_MIN_CHANNELS and hw is not None
            and all(s % 4 == 0 and lo <= s <= hi for s in hw))


def resolve_conv_impl(impl: str, backend: str | None = None, *, train: bool = False,
                      hw: tuple[int, int] | None = None, channels: int | None = None,
                      kernel: int = 3, dtype=None, batch: int | None = None,
                      out_channels: int | None = None) -> str:
    """The conv implementation `impl` means for one layer (`hw` = its input map's height
    and width, `channels` its input channels, `kernel` its size, `batch` its images and
    `out_channels` its outputs: without these two the work rules below are skipped). 'auto':
    - GPU/TPU: 'xla' (cuDNN / the TPU's conv unit).
    - CPU, maps of < MIN_YNN_PIXELS pixels and 1x1 kernels in training: 'im2col'.
    - CPU, training: 'winograd4' (F(4x4, 3x3)) for 3x3 kernels with >=
      WINOGRAD4_MIN_CHANNELS inputs on maps whose sides are multiples of 4 within
      WINOGRAD4_SIDES, else 'winograd' (F(2x2, 3x3)) from WINOGRAD_MIN_CHANNELS input
      channels (XLA:CPU's own conv backward, the filter gradient especially, is several
      times slower than these matmuls there), 'xla' from XLA_MIN_CHANNELS (conv1_1's 3
      channels: its filter gradient, all a first layer needs, is faster than im2col's),
      'im2col' below (a grayscale conv1_1); and where the Winograd choices would not repay
      their compile or run slower: 'xla' below TRAIN_WINOGRAD_MIN_WORK, 'im2col' on fewer
      than TRAIN_WINOGRAD_PIXELS_PER_CHANNEL x Cin pixels in the batch.
    - CPU, inference: 'winograd' for 3x3 kernels with >= EVAL_WINOGRAD_MIN_CHANNELS inputs
      on maps of at most EVAL_WINOGRAD_MAX_SIDE per side and at least
      EVAL_WINOGRAD_MIN_WORK of work, else 'xla', which runs through YNNPACK
      (`set_default_xla_flags`).
    The Winograd choices are for 3x3 kernels; asked of a 1x1 conv (config C) they mean
    'im2col' (a plain matmul). With a 16-bit `dtype` (the compute dtype), 'auto' takes
    F(2x2) where it would take F(4x4) (see winograd_conv3x3)."""
    check_choice("conv_impl", impl, CONV_IMPLS)
    if impl in WINOGRAD_IMPLS and kernel != 3:
        return "im2col"
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    if hw is not None and hw[0] * hw[1] < MIN_YNN_PIXELS or (train and kernel != 3):
        return "im2col"
    pixels = batch * hw[0] * hw[1] if None not in (batch, hw) else None
    work = pixels * channels * out_channels if None not in (pixels, channels, out_channels) \
        else None
    if train:
        if channels is not None and channels < WINOGRAD_MIN_CHANNELS:
            return "im2col" if channels < XLA_MIN_CHANNELS else "xla"
        if work is not None and work < TRAIN_WINOGRAD_MIN_WORK:
            return "xla"
        if None not in (pixels, channels) and pixels < TRAIN_WINOGRAD_PIXELS_PER_CHANNEL * channels:
            return "im2col"
        if _fits_winograd4(hw, channels):
            low = dtype is not None and jnp.dtype(dtype).itemsize < 4
            return "winograd" if low else "winograd4"
        return "winograd"
    fits = hw is not None and max(hw) <= EVAL_WINOGRAD_MAX_SIDE
    enough = work is None or work >= EVAL_WINOGRAD_MIN_WORK
    if (kernel == 3 and fits and enough and channels is not None
            and channels >= EVAL_WINOGRAD_MIN_CHANNELS):
        return "winograd"
    return "xla"


KEEP_XLA_FLAGS = "VGG_JAX_KEEP_XLA_FLAGS"


def set_default_xla_flags() -> bool:
    """Make the idiomatic path the fast one (`runtime.configure_cpu`, an opt-in): add
    CPU_PROCESS_OPTIONS to XLA_FLAGS, so `jax.jit(model.apply)` runs eval-mode convs
    through YNNPACK on CPU without `jit_eval`, and a training step compiles with the
    classic fusion emitters (faster Winograd transforms, ~1 GB less compile memory for
    VGG-16) and without LLVM's loop unrolling and SLP vectorizer (a quarter less compile
    time) and with the memory-minimizing scheduler (fewer temporaries alive at once). Each
    option only when the user has set no value for it, none when $VGG_JAX_KEEP_XLA_FLAGS is
    set. XLA reads XLA_FLAGS when JAX starts its CPU backend (the first computation), so
    calling this after running JAX code leaves them off (`jit_eval` and the training step
    still set the per-computation ones). They are XLA:CPU's only: GPU/TPU ignore them.
    Returns whether XLA_FLAGS was changed."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{k}={v}" for k, v in CPU_PROCESS_OPTIONS.items() if k not in flags]
    if os.environ.get(KEEP_XLA_FLAGS) or not extra:
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return True


def eval_compiler_options(backend: str | None = None) -> dict | None:
    """XLA compiler options for inference-mode jits: YNNPACK convs on CPU, none elsewhere."""
    return dict(CPU_EVAL_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None


def train_compiler_options(backend: str | None = None) -> dict | None:
    """XLA compiler options for training-step jits: YNNPACK's dots and convs and the classic
    fusion emitters on CPU (CPU_TRAIN_OPTIONS), none elsewhere."""
    return dict(CPU_TRAIN_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None


# Variable initialisation is random-number generation (threefry) and little else; with the
# classic emitters (CPU_PROCESS_OPTIONS) XLA:CPU compiles threefry 2.5-5x slower: 62 s of
# CPU to compile a width-1/16 VGG-19's init, 25 s with the fusion emitters back on; 22 s
# -> 13 s for VGG-16 at full width, which then runs as fast (bench/RESULTS.md, 2026-11-29).
CPU_INIT_OPTIONS = {"xla_cpu_use_fusion_emitters": True}


def init_compiler_options(backend: str | None = None) -> dict | None:
    """XLA compiler options for jits that initialise variables (models.init_variables,
    train.py's state): XLA:CPU's fusion emitters back on for them, none elsewhere."""
    return dict(CPU_INIT_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None


def jit_eval(fun, **jit_kwargs):
    """jax.jit with `eval_compiler_options()`, for functions that run the net in eval mode
    (predict, evaluate, embed, saliency, the eval step). The backend is looked up at the
    first call, not at import, so XLA_FLAGS and jax.config set later still count."""
    jitted = None

    @functools.wraps(fun)
    def call(*args, **kwargs):
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fun, compiler_options=eval_compiler_options(), **jit_kwargs)
        return jitted(*args, **kwargs)

    return call


def conv2d(x, kernel, impl: str, padding: str = "SAME"):
    """NHWC x HWIO, stride 1. 'im2col' stacks the k*k shifted views on the channel axis and
    does one matmul; 'winograd' is winograd_conv3x3 (3x3 'same'; anything else goes the
    im2col way). Each equals lax.conv to float tolerance (tests/test_conv_impl.py)."""
    kh, kw, cin, cout = kernel.shape
    if impl in WINOGRAD_IMPLS and (kh, kw) == (3, 3) and padding == "SAME":
        return winograd_conv3x3(x, kernel, WINOGRAD_IMPLS[impl])
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if padding == "SAME":
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        x = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    n, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    if kh == kw == 1:
        patches = x
    else:
        patches = jnp.concatenate(
            [x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


def conv_layer(x, kernel, impl: str = "auto", *, train: bool = False):
    """A VGG conv layer (stride 1, 'same') with `impl` resolved for its shape. 'auto' is
    resolved for the platform the computation is compiled for, not for
    jax.default_backend() at trace time: lax.platform_dependent keeps the CPU choice
    and XLA's conv for every other platform, and the lowering picks one, so a model
    placed on a GPU of a host whose default backend is CPU (or the reverse) gets the
    right algorithm."""
    shape = dict(train=train, hw=x.shape[1:3], channels=x.shape[3], kernel=kernel.shape[0],
                 dtype=x.dtype, batch=x.shape[0], out_channels=kernel.shape[3])
    if impl != "auto":
        return conv2d(x, kernel, resolve_conv_impl(impl, **shape))
    on_cpu = resolve_conv_impl("auto", "cpu", **shape)
    if on_cpu == "xla":
        return conv2d(x, kernel, "xla")
    return jax.lax.platform_dependent(
        x, kernel, cpu=lambda x, k: conv2d(x, k, on_cpu), default=lambda x, k: conv2d(x, k, "xla"))
