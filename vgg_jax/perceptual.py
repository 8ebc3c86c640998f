"""VGG as a fixed loss network: LPIPS (Zhang et al. 2018) equal to the `lpips` package,
Gatys et al.'s (2016) content and style losses, the per-channel mean and standard
deviation style transfer nets match (AdaIN, Huang & Belongie 2017; MetaNet, Shen et al.
2018), and total variation.

Every function is pure (arrays in, arrays out) and works under `jit`, `grad` and `vmap`;
images and feature maps are NHWC. Features come from `vgg_jax.extract` by tap name
(`relu3_3`, `conv3_3_pre`, ...: models.tap_names); `lpips` returns its function with the
parameters it needs, to pass as a pytree like any other:

    fn, params = perceptual.lpips("lpips:vgg")
    loss = lambda p, out, target: fn(params, out, target).mean()   # in jax.grad

LPIPS' own code divides each feature vector by `sqrt(sum f**2) + eps`, whose gradient is
NaN wherever a vector is zero (a NaN that a ReLU before the tap masks for image
gradients in float32, and that reaches every gradient taken at the tap itself); here the
norm's gradient at a zero vector is taken as 0, which leaves the values as they are and
gives d/df = 1/eps there, the function's own derivative.
"""
from __future__ import annotations

import importlib.util
import os
import jax.numpy as jnp
import numpy as np

from vgg_jax import models, published
from vgg_jax.errors import UserError

LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# lpips' ScalingLayer (v0.1): images in [-1, 1] to ImageNet's normalisation, (x - shift) / scale
LPIPS_SHIFT = np.array([-.030, -.088, -.188], np.float32)
LPIPS_SCALE = np.array([.458, .448, .450], np.float32)
# The v0.1 linear weights for the VGG-16 trunk, as the lpips package ships them
LPIPS_LINEAR = published.Published(
    "lpips:vgg", "vgg16",
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", False, "lpips",
    None, None)
LPIPS_NAMES = ("lpips:vgg",)


# ----------------------------------------------------------------------------- features

def normalize(features, eps: float = 1e-10):
    """lpips.normalize_tensor: each position's feature vector divided by its L2 norm plus
    `eps` (channels last), with a finite gradient at zero vectors (module docstring)."""
    ss = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    nonzero = ss > 0
    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, ss, 1.0)), 0.0)
    return features / (norm + eps)


def gram(features):
    """Gatys et al.'s Gram matrix, (N, C, C): F^T F over the H*W positions, divided by
    C*H*W (so that `style_loss`'s 1/4 sum of squares is their E_l = sum (G - A)^2 /
    (4 N_l^2 M_l^2))."""
    n, h, w, c = features.shape
    f = features.reshape(n, h * w, c)
    return jnp.einsum("npc,npd->ncd", f, f) / (h * w * c)


def mean_std(features, eps: float = 1e-5):
    """Per-channel mean and standard deviation over the positions, each (N, C): AdaIN's
    calc_mean_std (and MetaNet's), the unbiased variance plus `eps` under the root."""
    n, h, w, c = features.shape
    f = features.reshape(n, h * w, c)
    mean = f.mean(axis=1)
    var = jnp.sum(jnp.square(f - mean[:, None]), axis=1) / max(h * w - 1, 1)
    return mean, jnp.sqrt(var + eps)


def content_loss(features, target):
    """Gatys et al.'s content loss (eq. 1): 1/2 sum (F - P)^2 per image, (N,)."""
    return 0.5 * jnp.sum(jnp.square(features - target), axis=(1, 2, 3))


def style_loss(features: dict, targets: dict, weights: dict | None = None):
    """Gatys et al.'s style loss (eqs. 4-5): sum over taps of w_l E_l, per image (N,).
    `features` {tap: (N, H, W, C)} of the image; `targets` {tap: Gram matrix (N or 1, C,
    C)} of the style image (`gram` of its features); `weights` {tap: w_l}, equal weights
    1 / len(targets) when None."""
    weights = weights or {k: 1.0 / len(targets) for k in targets}
    total = 0.0
    for tap, w in weights.items():
        g = gram(features[tap])
        total = total + w * 0.25 * jnp.sum(jnp.square(g - targets[tap]), axis=(1, 2))
    return total


def mean_std_loss(features: dict, targets: dict, weights: dict | None = None):
    """The style loss of AdaIN / MetaNet: per tap, the summed squared difference of the
    per-channel means plus that of the standard deviations (`mean_std`), weighted and
    summed over taps, per image (N,). `targets` {tap: (mean, std)}."""
    weights = weights or {k: 1.0 for k in targets}
    total = 0.0
    for tap, w in weights.items():
        m, s = mean_std(features[tap])
        tm, ts = targets[tap]
        total = total + w * (jnp.sum(jnp.square(m - tm), axis=-1) +
                             jnp.sum(jnp.square(s - ts), axis=-1))
    return total


def total_variation(images):
    """Anisotropic total variation per image, (N,): the summed absolute differences of
    vertically and horizontally neighbouring pixels."""
    dh = jnp.abs(images[:, 1:] - images[:, :-1]).sum(axis=(1, 2, 3))
    dw = jnp.abs(images[:, :, 1:] - images[:, :, :-1]).sum(axis=(1, 2, 3))
    return dh + dw


# ----------------------------------------------------------------------------- LPIPS

def _backbone_variables(backbone) -> dict:
    """VGG-16 conv variables from a weights reference (directory, workdir, published
    name), a torchvision state_dict file (.pth) or a variables dict."""
    if isinstance(backbone, dict):
        variables = backbone
    elif isinstance(backbone, str) and backbone.endswith((".pth", ".pt")):
        from vgg_jax import convert
        variables = convert.from_torch(backbone, "vgg16", include_top=False)
    else:
        from vgg_jax import weights
        variables, meta = weights.load_weights(backbone)
        arch = models.canonical_name(meta["model"]["arch"])
        if arch != "vgg16":
            raise UserError(f"LPIPS' trunk is VGG-16 (torchvision's vgg16), but {backbone} is "
                            f"{arch}")
    # the conv stack only: fc6-fc8 (0.5 GB for VGG-16) are not part of the loss
    return {"params": {k: v for k, v in variables["params"].items() if k.startswith("conv")}}


def _installed_lin() -> str | None:
    """The v0.1 VGG linear weights an installed `lpips` package ships (found without
    importing it: its import loads torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else None


def _lin_weights(lin) -> list:
    """The five (C,) weight vectors of LPIPS' 1x1 linear layers (lin0..lin4), from lpips'
    vgg.pth (a file, or fetched and verified like published weights) or a list."""
    if isinstance(lin, (list, tuple)):
        return [jnp.asarray(w, jnp.float32).reshape(-1) for w in lin]
    from vgg_jax import convert
    if lin is None:
        with published.fetched(LPIPS_LINEAR, local=_installed_lin()) as path:
            sd = convert.load_state_dict(path)
    else:
        sd = convert.load_state_dict(lin)
    try:
        return [jnp.asarray(np.asarray(sd[f"lin{k}.model.1.weight"], np.float32).reshape(-1))
                for k in range(len(LPIPS_TAPS))]
    except KeyError as e:
        raise UserError(f"{lin or LPIPS_LINEAR.filename} has no {e.args[0]}: expected lpips' "
                        f"v0.1 linear weights for VGG (lin0.model.1.weight ... lin4)") from None


def lpips(name: str | None = None, *, backbone=None, lin=None, conv_impl: str = "auto"):
    """LPIPS with the VGG-16 trunk, as `lpips.LPIPS(net='vgg')` (v0.1): (fn, params).

    `fn(params, x0, x1)` -> the (N,) distances between NHWC images in [-1, 1] (the lpips
    package's convention; `2 * x - 1` for [0, 1] images). `name='lpips:vgg'` is
    torchvision's VGG-16 (`torchvision:vgg16`) with the v0.1 linear weights (an installed
    lpips package's copy, else fetched: hash-checked and cached like published weights);
    or give `backbone` (a weights directory, workdir, published name, torchvision
    state_dict .pth or variables) and `lin` (lpips' vgg.pth or five weight vectors).
    `params` is {'backbone': variables, 'lin': [five (C,) vectors]}."""
    if name is not None and name not in LPIPS_NAMES:
        raise UserError(f"unknown LPIPS name {name!r}; known: {', '.join(LPIPS_NAMES)}")
    if name is None and backbone is None:
        raise UserError("give a name (lpips:vgg) or backbone= (and lin=) to lpips()")
    params = {"backbone": _backbone_variables(backbone or "torchvision:vgg16"),
              "lin": _lin_weights(lin)}
    model = models.create_model("vgg16", include_top=False, conv_impl=conv_impl)
    return lpips_fn(model), params


def lpips_fn(model: models.VGG):
    """The LPIPS distance over `model`'s taps (LPIPS_TAPS) as a pure function
    fn(params, x0, x1) -> (N,)."""
    def taps(params, x):
        x = (x.astype(jnp.float32) - LPIPS_SHIFT) / LPIPS_SCALE
        _, state = model.apply(params["backbone"], x, train=False, capture=LPIPS_TAPS,
                               mutable=["intermediates"])
        return state["intermediates"]["layers"][0]

    def fn(params, x0, x1):
        # one pass per image, as the lpips package: a gradient with respect to one of them
        # (the usual loss: the output against a fixed target) then runs the backward pass
        # through that one's trunk only, not through a batch holding both
        f0, f1 = taps(params, x0), taps(params, x1)
        d = 0.0
        for tap, w in zip(LPIPS_TAPS, params["lin"]):
            diff = jnp.square(normalize(f0[tap]) - normalize(f1[tap]))
            d = d + jnp.mean(jnp.einsum("nhwc,c->nhw", diff, w), axis=(1, 2))
        return d
    return fn


__all__ = ["LPIPS_TAPS", "content_loss", "gram", "lpips", "lpips_fn", "mean_std",
           "mean_std_loss", "normalize", "style_loss", "total_variation"]
