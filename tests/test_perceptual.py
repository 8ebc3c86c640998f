"""VGG as a loss network (issue 49): named taps against torchvision's own `features`
slices, LPIPS against the `lpips` package (0.1.4, its shipped v0.1 linear weights, our
converted trunk loaded into it), gradients finite where the original's are NaN, and the
Gatys / AdaIN losses against the same formulas computed by PyTorch."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import import_torchvision, lpips_reference
from vgg_jax import convert, models, perceptual, published
from vgg_jax.errors import UserError

tv = import_torchvision()
import lpips  # noqa: E402 (after torchvision's import: conftest.import_torchvision)

RNG = np.random.default_rng(0)


def torch_vgg(arch, seed=0, pool=None):
    torch.manual_seed(seed)
    net = getattr(tv.models, arch)(weights=None).eval()
    for m in net.features:
        if isinstance(m, torch.nn.BatchNorm2d):  # running statistics that matter
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    if pool == "avg":
        for i, m in enumerate(net.features):
            if isinstance(m, torch.nn.MaxPool2d):
                net.features[i] = torch.nn.AvgPool2d(2, 2)
    return net


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def from_nchw(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("arch", ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn",
                                  "vgg16_bn", "vgg19_bn"])
def test_every_tap_is_torchvisions_features_slice(arch):
    net = torch_vgg(arch)
    variables = convert.from_torch({k: v.numpy() for k, v in net.state_dict().items()}, arch,
                                   include_top=False)
    model = models.create_model(arch, include_top=False, conv_impl="xla")
    x = RNG.normal(size=(2, 32, 32, 3)).astype(np.float32)
    index = models.torchvision_index(arch)
    assert set(index) == set(models.tap_names(arch)) - {"fc6", "fc7", "fc8"}
    ours = models.extract(model, variables, x, list(index))
    with torch.no_grad():
        h, outs = to_nchw(x), []
        for m in net.features:
            h = m(h.clone())  # (the in-place ReLUs would overwrite a kept output)
            outs.append(h)
    for tap, i in index.items():
        kind = type(net.features[i]).__name__
        expected = {"pre": "Conv2d", "relu": "ReLU", "conv": "ReLU", "pool": "MaxPool2d"}
        assert kind == expected["pre" if tap.endswith("_pre") else tap.rstrip("0123456789_")], (
            tap, i, kind)
        assert rel(ours[tap], from_nchw(outs[i])) < 1e-5, tap
    # the README's examples
    if arch == "vgg16":
        assert (index["relu1_2"], index["conv1_2_pre"], index["relu4_3"]) == (3, 2, 22)
    if arch == "vgg16_bn":
        assert (index["relu1_2"], index["conv1_2_pre"]) == (5, 3)


def test_taps_outside_torchvision_come_from_the_layer_table():
    with pytest.raises(UserError, match="torchvision has no vgg16_c"):
        models.torchvision_index("C")
    names = models.tap_names("A-LRN")
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_1_pre", "lrn1", "pool1"]
    model = models.create_model("vgg13_5x5", include_top=False, conv_impl="xla")
    v = models.init_variables(model, jax.random.key(0), 32)
    x = RNG.normal(size=(1, 32, 32, 3)).astype(np.float32)
    f = models.extract(model, v, x, ["conv1_1_pre", "relu1_1"])
    assert np.array_equal(np.maximum(f["conv1_1_pre"], 0), f["relu1_1"])


def test_average_pools_are_torchvisions_with_avgpool2d():
    net = torch_vgg("vgg19", pool="avg")
    variables = convert.from_torch({k: v.numpy() for k, v in net.state_dict().items()},
                                   "vgg19", include_top=False)
    model = models.create_model("vgg19", include_top=False, conv_impl="xla", pooling="avg")
    x = RNG.normal(size=(2, 64, 64, 3)).astype(np.float32)
    ours = models.extract(model, variables, x, ["relu5_1", "pool5"])
    with torch.no_grad():
        ref = net.features(to_nchw(x))
        ref51 = net.features[:models.torchvision_index("vgg19")["relu5_1"] + 1](to_nchw(x))
    assert rel(ours["pool5"], from_nchw(ref)) < 1e-5
    assert rel(ours["relu5_1"], from_nchw(ref51)) < 1e-5


# ----------------------------------------------------------------------------- LPIPS

def photo_pairs(size):
    """Pairs (x0, x1) in [-1, 1], NHWC, from scikit-learn's two photos: noise, a 3-pixel
    shift, another crop of the same photo, the other photo, a flat image."""
    from sklearn.datasets import load_sample_images
    china, flower = [im.astype(np.float32) / 127.5 - 1 for im in load_sample_images().images]
    a = china[100:100 + size, 200:200 + size]
    pairs = [(a, np.clip(a + np.random.default_rng(1).normal(0, 0.1, a.shape), -1, 1)),
             (a, china[100:100 + size, 203:203 + size]),
             (a, china[10:10 + size, 20:20 + size]),
             (a, flower[50:50 + size, 300:300 + size]),
             (a, np.full_like(a, 0.2))]
    return (np.stack([p[0] for p in pairs]).astype(np.float32),
            np.stack([p[1] for p in pairs]).astype(np.float32))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The lpips package's LPIPS(net='vgg') with a random torchvision VGG-16 trunk (no
    trained VGG can be downloaded here), and ours from the same trunk, converted, with
    the v0.1 linear weights found the way `lpips:vgg` finds them (the installed package's
    copy, verified and cached)."""
    ref, sd = lpips_reference()
    cache = tmp_path_factory.mktemp("cache")
    published.use_cache(str(cache))
    try:
        fn, params = perceptual.lpips(backbone=convert.from_torch(sd, "vgg16",
                                                                  include_top=False))
    finally:
        published.use_cache(None)
    assert os.path.isfile(cache / "weights" / "downloads" / "vgg.pth")
    return ref, jax.jit(fn), params


@pytest.fixture(scope="module")
def xla_lpips(both):
    """The same distance with XLA's own convs (compiles fastest), for the tests of its
    gradients and transforms (the equality test runs the default, per-layer 'auto')."""
    return perceptual.lpips_fn(models.create_model("vgg16", include_top=False,
                                                   conv_impl="xla")), both[2]


@pytest.mark.parametrize("size", [64, 256])
def test_lpips_equals_the_lpips_package(both, size):
    ref, fn, params = both
    x0, x1 = photo_pairs(size)
    with torch.no_grad():
        expected = ref(to_nchw(x0), to_nchw(x1)).numpy().reshape(-1)
    got = np.asarray(fn(params, x0, x1))
    assert got.shape == (5,) and np.all(expected > 0)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5, (got, expected)
    # the order of the pairs' distances is the package's; identical images are at 0 (up to
    # the rounding of two batch positions)
    assert np.array_equal(np.argsort(got), np.argsort(expected))
    assert abs(float(fn(params, x0[:1], x0[:1])[0])) < 1e-9


def test_lpips_gradients_are_finite_where_the_originals_are_nan(xla_lpips):
    fn, params = xla_lpips
    # the normalisation itself, at a position whose feature vector is zero
    f = RNG.normal(size=(1, 4, 4, 8)).astype(np.float32)
    f[0, 1, 2] = 0.0
    t = to_nchw(f).requires_grad_(True)
    (lpips.normalize_tensor(t) ** 2 * torch.arange(8.0).reshape(1, 8, 1, 1)).sum().backward()
    assert torch.isnan(t.grad).any()  # the original: sqrt'(0) times 0
    g = jax.grad(lambda f: jnp.sum(perceptual.normalize(f) ** 2 * jnp.arange(8.0)))(f)
    assert np.isfinite(np.asarray(g)).all()
    # away from the zero vector the gradients are the original's
    t_grad = from_nchw(t.grad)
    keep = np.ones(f.shape[:3], bool)
    keep[0, 1, 2] = False
    assert rel(np.asarray(g)[keep], t_grad[keep]) < 1e-5
    # the whole distance, at a tap the weights make zero everywhere (conv1_2 off): the
    # gradient with respect to each tap is finite, and so is the image's
    x0, x1 = photo_pairs(32)
    dead = jax.tree.map(lambda x: x, params)
    dead["backbone"]["params"]["conv1_2"] = {
        "kernel": jnp.zeros_like(params["backbone"]["params"]["conv1_2"]["kernel"]),
        "bias": -jnp.ones_like(params["backbone"]["params"]["conv1_2"]["bias"])}
    gx = jax.grad(lambda x: fn(dead, x, x1).sum())(x0)
    assert np.isfinite(np.asarray(gx)).all()
    gp = jax.grad(lambda p: fn(p, x0, x1).sum())(dead)
    assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(gp))


def test_lpips_is_a_pure_function_for_jit_grad_and_vmap(xla_lpips):
    fn, params = xla_lpips
    x0, x1 = photo_pairs(32)
    batched = jax.vmap(lambda a, b: fn(params, a[None], b[None])[0])(x0, x1)
    np.testing.assert_allclose(np.asarray(batched), np.asarray(fn(params, x0, x1)), rtol=1e-5)
    g = jax.jit(jax.grad(lambda x: fn(params, x, x1).mean()))(x0)
    assert g.shape == x0.shape and np.isfinite(np.asarray(g)).all()


def test_lpips_linear_weights_are_verified_and_offline_is_one_line(tmp_path, monkeypatch):
    published.use_cache(str(tmp_path / "cache"))
    try:
        fake = tmp_path / "vgg.pth"
        fake.write_bytes(b"not the weights")
        monkeypatch.setattr(perceptual, "_installed_lin", lambda: str(fake))
        with pytest.raises(UserError, match="vgg.pth has sha256 .* but lpips:vgg is published "
                                            "with sha256 a78928a0"):
            perceptual.lpips(backbone={"params": {}})
        monkeypatch.setattr(perceptual, "_installed_lin", lambda: None)
        monkeypatch.setenv(published.URL_ENV, "http://127.0.0.1:9")
        downloads = tmp_path / "cache" / "weights" / "downloads"
        with pytest.raises(UserError, match=f"without network, place vgg.pth in {downloads} "
                                            f"by hand"):
            perceptual.lpips(backbone={"params": {}})
    finally:
        published.use_cache(None)
    with pytest.raises(UserError, match="unknown LPIPS name 'lpips:alex'; known: lpips:vgg"):
        perceptual.lpips("lpips:alex")


# ----------------------------------------------------------------------------- losses

def test_gram_mean_std_content_style_and_tv_equal_pytorch_values_and_gradients():
    f = RNG.normal(size=(2, 5, 6, 4)).astype(np.float32)
    p = RNG.normal(size=(2, 5, 6, 4)).astype(np.float32)
    style = RNG.normal(size=(1, 7, 3, 4)).astype(np.float32)
    x = RNG.normal(size=(2, 5, 6, 3)).astype(np.float32)

    def torch_gram(t):  # the PyTorch neural-transfer tutorial's, per image
        n, c, h, w = t.shape
        m = t.reshape(n, c, h * w)
        return m @ m.transpose(1, 2) / (c * h * w)

    def torch_mean_std(t, eps=1e-5):  # AdaIN's calc_mean_std
        n, c = t.shape[:2]
        v = t.reshape(n, c, -1)
        return v.mean(dim=2), (v.var(dim=2) + eps).sqrt()

    tf_, tp, ts, tx = (to_nchw(a).requires_grad_(True) for a in (f, p, style, x))
    g_style = torch_gram(ts)
    t_losses = {
        "content": 0.5 * ((tf_ - tp) ** 2).sum(dim=(1, 2, 3)),
        "style": 0.25 * ((torch_gram(tf_) - g_style) ** 2).sum(dim=(1, 2)),
        "mean_std": sum(((a - b) ** 2).sum(dim=1) for a, b in
                        zip(torch_mean_std(tf_), torch_mean_std(ts))),
        "tv": ((tx[:, :, 1:] - tx[:, :, :-1]).abs().sum(dim=(1, 2, 3)) +
               (tx[:, :, :, 1:] - tx[:, :, :, :-1]).abs().sum(dim=(1, 2, 3))),
    }
    j_losses = {
        "content": lambda f, x: perceptual.content_loss(f, p),
        "style": lambda f, x: perceptual.style_loss({"t": f}, {"t": perceptual.gram(style)},
                                                    {"t": 1.0}),
        "mean_std": lambda f, x: perceptual.mean_std_loss(
            {"t": f}, {"t": perceptual.mean_std(style)}),
        "tv": lambda f, x: perceptual.total_variation(x),
    }
    for name, t_loss in t_losses.items():
        got = j_losses[name](f, x)
        assert rel(got, t_loss.detach().numpy()) < 1e-5, name
        tf_.grad = tx.grad = None
        t_loss.sum().backward(retain_graph=True)
        gf, gx = jax.grad(lambda f, x: j_losses[name](f, x).sum(), argnums=(0, 1))(f, x)
        if name == "tv":
            assert rel(gx, from_nchw(tx.grad)) < 1e-5, name
        else:
            assert rel(gf, from_nchw(tf_.grad)) < 1e-5, name
    g = perceptual.gram(f)
    np.testing.assert_allclose(np.asarray(g), torch_gram(to_nchw(f)).numpy(), rtol=1e-5,
                               atol=1e-7)


# ----------------------------------------------------------------------------- stylize

def test_stylize_through_the_command_matches_the_style_and_keeps_the_content(tmp_path):
    """`vgg-jax stylize` in a fresh process, on a VGG-19 (random weights at a quarter width:
    no trained VGG can be downloaded here) and 64-pixel crops of scikit-learn's photos:
    the Gram matrices' term falls at least 10x while the result stays nearer the content
    image, by the content term, than the style image itself is."""
    import subprocess

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from conftest import user_env
    from vgg_jax import pixels, stylize, weights
    kw = dict(arch="vgg19", num_classes=10, width=0.25, include_top=False)
    model = models.create_model(**kw)
    weights.save_weights(str(tmp_path / "w"),
                         models.init_variables(model, jax.random.key(0), 64),
                         convert.weights_meta(kw, "torchvision"))
    china, flower = load_sample_images().images
    Image.fromarray(china[100:228, 200:328]).save(tmp_path / "content.png")
    Image.fromarray(flower[50:178, 300:428]).save(tmp_path / "style.png")
    out = tmp_path / "out" / "result.png"
    r = subprocess.run(["vgg-jax", "stylize", str(tmp_path / "content.png"),
                        str(tmp_path / "style.png"), "--out", str(out), "--weights",
                        str(tmp_path / "w"), "--size", "64", "--steps", "80"],
                       env=user_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    side = Image.open(tmp_path / "out" / "result_side_by_side.png")
    assert side.size == (3 * 64, 64) and Image.open(out).size == (64, 64)
    # the terms, computed again here from the files (as the command reads them)
    variables, meta = weights.load_weights(str(tmp_path / "w"))
    net = weights.model_from_meta(meta, include_top=False, pooling="avg", conv_impl="xla")
    content = stylize.read_rgb(str(tmp_path / "content.png"), 64)
    style = stylize.read_rgb(str(tmp_path / "style.png"), (64, 64))
    result = np.asarray(Image.open(out), np.float32) / 255.0
    terms = stylize.losses_fn(net, variables, pixels.for_data(weights.data_config(meta)),
                              content, style)
    (c0, s0), (c1, s1), (c_style, _) = terms(content), terms(result), terms(style)
    assert c0 == 0.0 and s1 <= s0 / 10, (s0, s1)
    assert c1 < c_style, (c1, c_style)
