"""Convolution algorithms for VGG's stride-1 'same' convs, and which one a layer runs.

On GPU/TPU every conv is XLA's own (cuDNN, the TPU's conv unit). XLA:CPU's convs are
slow, the backward especially, so on CPU `conv_impl='auto'` picks per layer among
XLA's conv (through YNNPACK for inference), im2col (the k*k shifted views stacked on the
channel axis, one matmul) and Winograd F(2x2, 3x3). Each equals lax.conv_general_dilated
to float rounding (tests/test_conv_impl.py); bench/RESULTS.md has the measurements behind
the thresholds. `models.conv_plan` lists the choice per layer of a network.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from vgg_jax.choices import CONV_IMPLS
from vgg_jax.errors import check_choice

# XLA:CPU runs lax.conv through YNNPACK only when asked (jaxlib 0.10); with it, the 3x3
# convs of VGG at >= 4x4 maps run 2-5x faster than with Eigen or im2col (bench/RESULTS.md).
# The list replaces XLA's default one, so it keeps YNNPACK's dots on as well.
CPU_EVAL_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
MIN_YNN_PIXELS = 16  # YNNPACK's conv is pathological on 2x2 maps (~2 GFLOP/s)
# Winograd F(2x2, 3x3) does 2.25x fewer multiplies, but its transforms cost per pixel and
# channel: on the 2-core CPU it beats the alternatives from 128 input channels on maps of
# at most 28x28 (conv2_2 onwards at 32x32, conv4/conv5 at 224; bench/RESULTS.md).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MAX_PIXELS = 28 * 28


def resolve_conv_impl(impl: str, backend: str | None = None, *, train: bool = False,
                      pixels: int | None = None, channels: int | None = None,
                      kernel: int = 3) -> str:
    """The conv implementation `impl` means for one layer (`pixels` = H*W of its input,
    `channels` its input channels, `kernel` its size). 'auto':
    - GPU/TPU: 'xla' (cuDNN / the TPU's conv unit).
    - CPU, 3x3 kernels with >= WINOGRAD_MIN_CHANNELS input channels on maps of
      <= WINOGRAD_MAX_PIXELS: 'winograd', training and inference.
    - CPU, training otherwise: 'im2col' (XLA:CPU's conv backward, the filter gradient
      especially, is several times slower than one big matmul over the patches).
    - CPU, inference otherwise: 'xla' for maps of >= MIN_YNN_PIXELS pixels, run through
      YNNPACK by `eval_compiler_options`; 'im2col' for smaller maps.
    'winograd' is for 3x3 kernels; asked of a 1x1 conv (config C) it means 'im2col'
    (a plain matmul)."""
    check_choice("conv_impl", impl, CONV_IMPLS)
    if impl == "winograd" and kernel != 3:
        return "im2col"
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    if (kernel == 3 and channels is not None and channels >= WINOGRAD_MIN_CHANNELS
            and pixels is not None and pixels <= WINOGRAD_MAX_PIXELS):
        return "winograd"
    if train or (pixels is not None and pixels < MIN_YNN_PIXELS):
        return "im2col"
    return "xla"


KEEP_XLA_FLAGS = "VGG_JAX_KEEP_XLA_FLAGS"


def set_default_xla_flags() -> bool:
    """Make the idiomatic path the fast one: vgg_jax's import adds CPU_EVAL_OPTIONS to
    XLA_FLAGS, so `jax.jit(model.apply)` runs eval-mode convs through YNNPACK on CPU
    without `jit_eval`. Only when the user has set no value for that option and
    $VGG_JAX_KEEP_XLA_FLAGS is unset; XLA reads XLA_FLAGS when JAX starts its CPU backend
    (the first computation), so importing vgg_jax after running JAX code leaves it off
    (`jit_eval` still sets it per jit). The option is XLA:CPU's only: GPU/TPU ignore it,
    and training convs on CPU are im2col/Winograd matmuls, which it does not change.
    Returns whether XLA_FLAGS was changed."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get(KEEP_XLA_FLAGS) or any(k in flags for k in CPU_EVAL_OPTIONS):
        return False
    extra = " ".join(f"--{k}={v}" for k, v in CPU_EVAL_OPTIONS.items())
    os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
    return True


def eval_compiler_options(backend: str | None = None) -> dict | None:
    """XLA compiler options for inference-mode jits: YNNPACK convs on CPU, none elsewhere."""
    return dict(CPU_EVAL_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None


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


def _winograd_bt(a, b, c, d):
    """B^T of F(2x2, 3x3) along one axis: 4 input taps -> 4 transformed values."""
    return [a - c, b + c, c - b, b - d]


def _winograd_g(a, b, c):
    """G of F(2x2, 3x3) along one axis: 3 kernel taps -> 4."""
    return [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c]


def _winograd_at(m0, m1, m2, m3):
    """A^T of F(2x2, 3x3) along one axis: 4 products -> 2 outputs."""
    return [m0 + m1 + m2, m1 - m2 - m3]


def winograd_conv3x3(x, kernel):
    """'same' 3x3 conv, stride 1, NHWC x HWIO, by Winograd's minimal filtering F(2x2, 3x3)
    (Lavin & Gray 2016): each 2x2 output tile from a 4x4 input tile with 16 products per
    channel pair instead of 36. Transforms: input B^T d B, kernel G g G^T, output A^T m A;
    the 16 products are 16 matmuls (tiles x Cin) . (Cin x Cout). Every step is linear, so
    autodiff gives a backward with the same 2.25x saving. The coefficients are 0, +-1 and
    +-1/2: the result equals lax.conv to float rounding (tests/test_conv_impl.py)."""
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    dtype = x.dtype  # the matmul's operands; transforms and sums in at least float32
    ct = jnp.promote_types(dtype, jnp.float32)
    x, kernel = x.astype(ct), kernel.astype(ct)
    th, tw = -(-h // 2), -(-w // 2)  # output tiles; odd sizes are cropped at the end
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    rows = _winograd_bt(*(xp[:, a:a + 2 * th:2] for a in range(4)))
    d = jnp.stack([t for r in rows
                   for t in _winograd_bt(*(r[:, :, b:b + 2 * tw:2] for b in range(4)))])
    u = jnp.stack([t for r in _winograd_g(*kernel) for t in _winograd_g(*r)])  # (16, cin, cout)
    m = jnp.einsum("stc,scf->stf", d.reshape(16, n * th * tw, cin).astype(dtype),
                   u.astype(dtype), preferred_element_type=ct)
    m = m.reshape(4, 4, n, th, tw, cout)
    y = jnp.stack([jnp.stack(_winograd_at(*r)) for r in _winograd_at(*m)])  # (2, 2, n, th, tw, f)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, cout)
    return y[:, :h, :w].astype(dtype)


def conv2d(x, kernel, impl: str, padding: str = "SAME"):
    """NHWC x HWIO, stride 1. 'im2col' stacks the k*k shifted views on the channel axis and
    does one matmul; 'winograd' is winograd_conv3x3 (3x3 'same'; anything else goes the
    im2col way). Each equals lax.conv to float tolerance (tests/test_conv_impl.py)."""
    kh, kw, cin, cout = kernel.shape
    if impl == "winograd" and (kh, kw) == (3, 3) and padding == "SAME":
        return winograd_conv3x3(x, kernel)
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
    h, w, cin = x.shape[1], x.shape[2], x.shape[3]
    k = kernel.shape[0]
    shape = dict(train=train, pixels=h * w, channels=cin, kernel=k)
    if impl != "auto":
        return conv2d(x, kernel, resolve_conv_impl(impl, **shape))
    on_cpu = resolve_conv_impl("auto", "cpu", **shape)
    if on_cpu == "xla":
        return conv2d(x, kernel, "xla")
    return jax.lax.platform_dependent(
        x, kernel, cpu=lambda x, k: conv2d(x, k, on_cpu), default=lambda x, k: conv2d(x, k, "xla"))
