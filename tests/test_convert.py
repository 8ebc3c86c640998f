"""Parity with PyTorch: torchvision-layout state_dicts into Flax and back.

The eight torchvision layouts run at 1/8 width with 64-wide fc layers (same module layout
and key names, smaller tensors: XLA's CPU convs are slow); vgg11 also runs full size."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a declared test dependency: a broken install fails, never skips
from torchvision_vgg import VGG, randomize

from vgg_jax import convert, models, weights
from vgg_jax.errors import UserError

LAYOUTS = [(n, bn) for n in ("vgg11", "vgg13", "vgg16", "vgg19") for bn in (False, True)]


def logits_both(tmodel, arch, sizes, num_classes=None):
    variables = convert.from_torch(tmodel.state_dict(), arch, num_classes)
    kw = convert.infer_model_kwargs(convert.load_state_dict(tmodel.state_dict()), arch)
    model = models.create_model(**kw)
    apply = jax.jit(lambda v, x: model.apply(v, x))
    out = []
    for size in sizes:
        x = np.random.default_rng(size).normal(size=(2, 3, *size)).astype(np.float32)
        with torch.no_grad():
            ref = tmodel(torch.from_numpy(x)).numpy()
        got = np.asarray(apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
        out.append((ref, got))
    return out


def assert_logits_close(ref, got):
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), (err, np.abs(ref).max())


@pytest.mark.parametrize("name,bn", LAYOUTS)
def test_logits_match_torch_for_every_torchvision_layout(name, bn):
    tmodel = randomize(VGG(name, bn, num_classes=17, width=1 / 8, fc=64), seed=len(name) + bn)
    arch = name + ("_bn" if bn else "")
    # 224: pool5 is 7x7 (the paper's path); 80x112: adaptive-pool path with uneven bins
    for ref, got in logits_both(tmodel, arch, [(224, 224), (80, 112)]):
        assert_logits_close(ref, got)


def test_full_size_vgg11_logits_match_torch():
    tmodel = randomize(VGG("vgg11"), seed=11)
    for ref, got in logits_both(tmodel, "vgg11", [(224, 224)]):
        assert ref.shape == (2, 1000)
        assert_logits_close(ref, got)


@pytest.mark.parametrize("name,bn", [("vgg16", True), ("vgg11", False)])
def test_round_trip_torch_flax_torch_is_bit_exact(name, bn):
    sd = randomize(VGG(name, bn, num_classes=10, width=1 / 8, fc=32), seed=3).state_dict()
    arch = name + ("_bn" if bn else "")
    back = convert.to_torch(convert.from_torch(sd, arch), arch)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_fc6_rows_permuted_to_hwc():
    w = np.arange(4 * 2 * 7 * 7, dtype=np.float32).reshape(4, 2 * 7 * 7)  # (out, C*H*W)
    k = convert.fc6_torch_to_flax(w, 7)
    c, h, x = 1, 3, 5  # torch row index c*49 + h*7 + x; Flax row (h*7 + x)*C + c
    np.testing.assert_array_equal(k[(h * 7 + x) * 2 + c], w[:, c * 49 + h * 7 + x])
    np.testing.assert_array_equal(convert.fc6_flax_to_torch(k, 7), w)


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_training_gradients_match_torch_at_small_inputs(size):
    """Below 224 torchvision upsamples pool5 to 7x7 (AdaptiveAvgPool2d) before fc6; vgg_jax
    folds that pool into fc6's kernel and pools by reshape-max. Every parameter's gradient
    of the cross-entropy equals torch's (32: pool5 is 1x1; 64x48: 2x1, uneven bins)."""
    tmodel = randomize(VGG("vgg11", num_classes=6, width=1 / 8, fc=24), seed=3)
    tmodel.classifier[2].p = tmodel.classifier[5].p = 0.0  # no dropout in either
    variables = convert.from_torch(tmodel.state_dict(), "vgg11")
    model = models.create_model("vgg11", num_classes=6, width=1 / 8, fc_widths=(24, 24),
                                dropout_rate=0.0)
    r = np.random.default_rng(size[1])
    x = r.normal(size=(3, 3, *size)).astype(np.float32)
    y = r.integers(0, 6, 3)
    loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    want = convert.from_torch({k: p.grad for k, p in tmodel.named_parameters()}, "vgg11")

    def loss_fn(params):
        logits = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y)[:, None], 1)
        return -jnp.mean(picked)

    value, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    np.testing.assert_allclose(value, loss.item(), rtol=1e-5)
    for layer in ("conv1_1", "conv4_2", "fc6", "fc8"):
        for name in ("kernel", "bias"):
            ref = want["params"][layer][name]
            np.testing.assert_allclose(grads[layer][name], ref, rtol=1e-4,
                                       atol=1e-4 * np.abs(ref).max())


def test_bn_model_trained_one_step_moves_running_stats_like_torch_momentum_0_1():
    tmodel = randomize(VGG("vgg11", True, num_classes=5, width=1 / 8, fc=16), seed=5)
    variables = convert.from_torch(tmodel.state_dict(), "vgg11_bn")
    model = models.create_model("vgg11_bn", num_classes=5, width=1 / 8, fc_widths=(16, 16),
                                dropout_rate=0.0)
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32) + 1.0
    tmodel.train()
    with torch.no_grad():
        tmodel(torch.from_numpy(x))
    _, state = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True,
                           rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    ref = convert.from_torch(tmodel.state_dict(), "vgg11_bn")["batch_stats"]
    for layer in ("bn1_1", "bn3_2", "bn5_2"):
        old = variables["batch_stats"][layer]["mean"]
        new, want = np.asarray(state["batch_stats"][layer]["mean"]), ref[layer]["mean"]
        assert np.abs(want - old).max() > 1e-3  # the stats really moved
        np.testing.assert_allclose(new, want, rtol=1e-4, atol=1e-5)
        # torch's running_var uses the unbiased batch variance (n / (n - 1)), Flax the
        # biased one: equal up to that factor, which is tiny for n = N*H*W.
        np.testing.assert_allclose(state["batch_stats"][layer]["var"], ref[layer]["var"],
                                   rtol=2e-2)


def test_wrong_architecture_names_the_first_bad_key():
    sd = VGG("vgg16", width=1 / 8, fc=32).state_dict()
    with pytest.raises(ValueError, match=r"vgg19: weights file has no 'features.16.weight' "
                                         r"\(expected shape \(32, 32, 3, 3\)\)"):
        convert.from_torch(sd, "vgg19")
    with pytest.raises(ValueError, match=r"vgg13: weights file has no 'features.15.weight'"):
        convert.from_torch(sd, "vgg13")
    sd = dict(VGG("vgg11", width=1 / 8, fc=32).state_dict(), **{"features.30.weight": torch.ones(2)})
    with pytest.raises(ValueError, match=r"unexpected key 'features.30.weight' with shape \(2,\)"):
        convert.from_torch(sd, "vgg11")


def test_wrong_class_count_names_the_key_and_both_shapes():
    sd = VGG("vgg11", num_classes=10, width=1 / 8, fc=32).state_dict()
    with pytest.raises(ValueError, match=r"'classifier.6.weight' has shape \(10, 32\) in the "
                                         r"weights file but the model expects \(1000, 32\)"):
        convert.from_torch(sd, "vgg11", num_classes=1000)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vgg_jax_pwned",))


def test_a_pickle_that_would_execute_code_is_refused(tmp_path):
    if os.path.exists("/tmp/vgg_jax_pwned"):
        os.remove("/tmp/vgg_jax_pwned")
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.0.weight": _Exploit()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        convert.load_state_dict(str(path))
    assert not os.path.exists("/tmp/vgg_jax_pwned")


def test_a_truncated_pth_is_named_as_unreadable_not_as_a_refused_pickle(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save({"features.0.weight": torch.ones(4, 3, 3, 3)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:200])  # what an interrupted download leaves
    with pytest.raises(UserError, match=f"cannot read {cut} as a torch file "
                                        r"\(truncated or not written by torch.save\): "):
        convert.load_state_dict(str(cut))


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_torch_free_formats_load_the_same_weights(tmp_path, ext):
    sd = randomize(VGG("vgg11", True, num_classes=3, width=1 / 8, fc=16)).state_dict()
    arrays = {k: v.numpy() for k, v in sd.items()}
    path = str(tmp_path / f"w{ext}")
    if ext == ".npz":
        np.savez(path, **arrays)
    else:
        from safetensors.numpy import save_file
        save_file(arrays, path)
    a, b = convert.from_torch(sd, "vgg11_bn"), convert.from_torch(path, "vgg11_bn")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _photo(path, size=(300, 400)):
    """A photo-like JPEG: smooth colour gradients, a disc and noise."""
    from PIL import Image
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255, yy / h * 255, 128 + 100 * np.sin(xx / 25.0)], -1)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < 60 ** 2] = (200, 30, 40)
    img += np.random.default_rng(0).normal(0, 8, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def test_cli_convert_predict_features_and_export(tmp_path, capsys):
    from vgg_jax import cli
    tmodel = randomize(VGG("vgg11", False, width=1 / 8, fc=32), seed=1)
    torch.save(tmodel.state_dict(), tmp_path / "vgg11.pth")
    assert cli.main(["convert", "--arch", "vgg11", "--from-torch", str(tmp_path / "vgg11.pth"),
                     "--out", str(tmp_path / "w")]) == 0
    _, meta = weights.load_weights(str(tmp_path / "w"))
    assert meta["preprocessing"]["convention"] == "torchvision"
    assert len(meta["class_names"]) == 1000 and meta["class_names"][0] == "tench"
    _photo(tmp_path / "photo.jpg")
    capsys.readouterr()
    assert cli.main(["predict", "--weights", str(tmp_path / "w"), str(tmp_path / "photo.jpg")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    probs = [float(l.split()[0]) for l in lines]
    names = [" ".join(l.split()[1:]) for l in lines]
    assert len(lines) == 5 and all(n in meta["class_names"] for n in names)
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    # the same top class as torch with torchvision's eval transform on the same pixels
    pred = weights.Net(str(tmp_path / "w"))
    x = pred.image(str(tmp_path / "photo.jpg"))
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).softmax(-1)[0].numpy()
    np.testing.assert_allclose(pred.probabilities(str(tmp_path / "photo.jpg")), ref, atol=1e-5)
    assert cli.main(["predict", "--weights", str(tmp_path / "w"), "--dense", "--q", "256",
                     str(tmp_path / "photo.jpg")]) == 0
    assert cli.main(["features", "--weights", str(tmp_path / "w"), "--layer", "fc7",
                     str(tmp_path / "photo.jpg"), str(tmp_path / "photo.jpg"),
                     "--out", str(tmp_path / "f.npy")]) == 0
    assert np.load(tmp_path / "f.npy").shape == (2, 32)
    assert cli.main(["convert", "--arch", "vgg11", "--from", str(tmp_path / "w"),
                     "--to-torch", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for k, v in tmodel.state_dict().items():
        assert torch.equal(back[k], v), k


def test_predict_on_a_corrupt_image_names_the_file(tmp_path, capsys):
    from vgg_jax import cli
    tmodel = VGG("vgg11", width=1 / 8, fc=16)
    torch.save(tmodel.state_dict(), tmp_path / "w.pth")
    cli.main(["convert", "--arch", "vgg11", "--from-torch", str(tmp_path / "w.pth"),
              "--out", str(tmp_path / "w")])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert cli.main(["predict", "--weights", str(tmp_path / "w"), str(tmp_path / "bad.jpg")]) == 2
    assert f"cannot decode image {tmp_path / 'bad.jpg'}" in capsys.readouterr().err


def test_convert_takes_the_arch_from_the_weights_and_refuses_a_mismatching_one(tmp_path,
                                                                              capsys):
    """vgg11_bn weights exported as vgg11 used to write 22 of 62 tensors (every BN
    dropped). Without --arch the directory's own architecture is used; a different one
    is refused, naming both and the layers that would be lost."""
    import jax
    from vgg_jax import cli, convert, models, weights
    kw = dict(arch="vgg11_bn", num_classes=10, width=1 / 16, fc_widths=(16, 16))
    model = models.create_model(**kw)
    variables = models.init_variables(model, jax.random.PRNGKey(0), 32)
    weights.save_weights(str(tmp_path / "w"), variables, convert.weights_meta(kw))
    out = tmp_path / "x.pth"
    assert cli.main(["convert", "--arch", "vgg11", "--from", str(tmp_path / "w"),
                     "--to-torch", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--arch vgg11 does not match the weights' architecture vgg11_bn" in err
    assert "bn1_1" in err and "bn5_2" in err and not out.exists()
    assert cli.main(["convert", "--from", str(tmp_path / "w"), "--to-torch", str(out)]) == 0
    import torch
    sd = torch.load(out, weights_only=True)
    convs = 8  # Table 1, config A
    assert len(sd) == 2 * convs + 5 * convs + 2 * 3  # conv w+b, BN w+b+mean+var+count, fc w+b
    with pytest.raises(ValueError, match="vgg11 has no layer.*bn1_1"):
        convert.to_torch(variables, "vgg11")


def test_convert_from_torch_without_arch_says_it_is_needed(tmp_path, capsys):
    from vgg_jax import cli
    assert cli.main(["convert", "--from-torch", str(tmp_path / "x.pth"), "--out",
                     str(tmp_path / "w")]) == 2
    assert "--from-torch needs --arch (e.g. vgg16, vgg16_bn)" in capsys.readouterr().err
