"""Paper fidelity (issue 16): the pre-initialisation recipe, fine-tuning stages that need
their parent run, test-time flips from the weights' recipe, Sec. 4.1's B-5x5, Caffe's
ceil-mode pools. Models are small (width 1/16 or 1/4) because XLA's CPU convs are slow."""
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config
from vgg_jax import models, preprocess, summary, train, views, weights
from vgg_jax.errors import UserError


def test_paper_preinit_copies_A_and_draws_the_rest_from_the_paper_init(tmp_path):
    a = models.create_model("A", num_classes=10, width=1 / 4, fc_widths=(64, 64),
                            classifier_pool=1, init_scheme="glorot")
    a_vars = models.init_variables(a, jax.random.key(7), 32)
    weights.save_weights(str(tmp_path / "netA"), a_vars, {"model": {"arch": "vgg11"}})
    c = load_config()
    c.model.update(arch="D", width=1 / 4, fc_widths=(64, 64), init_scheme="glorot")
    c.train.init_from, c.train.init_from_layers = str(tmp_path / "netA"), "paper"
    model = train.build_model(c, 10)
    assert model.init_scheme == "paper"  # not glorot: the paper's rule for the rest
    params = models.init_variables(model, jax.random.key(1), 32)["params"]
    new, _, _ = weights.load_layers(params, {}, a_vars, weights.paper_preinit_layers("A"))
    copied = {"conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"}
    for name in copied:
        np.testing.assert_array_equal(new[name]["kernel"], a_vars["params"][name]["kernel"])
    for name in set(new) - copied:
        k = np.asarray(new[name]["kernel"], np.float64).ravel()
        n = k.size  # the sample std of n normal draws has std ~ sigma / sqrt(2n)
        assert abs(k.std() - 0.01) < 5 * 0.01 / np.sqrt(2 * n), (name, k.std(), n)
        assert abs(k.mean()) < 5 * 0.01 / np.sqrt(n), name
        assert not np.any(new[name]["bias"])


def test_fine_tuning_stages_refuse_to_start_from_scratch():
    for arg, parent in (("D,384", "the S=256 D run"), ("D,256-512", "the S=384 D run")):
        c = load_config("imagenet", arg)
        with pytest.raises(UserError, match=f"this config fine-tunes {parent} .*"
                                            r"--config.train.init_from=WORKDIR"):
            train.validate(c)
        c.train.init_from_required = ""  # the explicit override
        train.validate(c)
    train.validate(load_config("imagenet", "D,256"))  # S=256 starts from scratch
    c = load_config("imagenet", "D,256")
    assert c.optim.decay_biases_and_bn is False  # as Caffe's ImageNet example


def small_224_net(flip: bool, arch="A"):
    """A random width-1/16 net at the paper's 224 crop, with a meta.json recording
    whether it was trained with flips."""
    c = load_config()
    c.model.update(arch=arch, width=1 / 16, fc_widths=(16, 16), classifier_pool=7)
    c.data.update(recipe="paper", image_size=224, s_min=224, s_max=224, eval_scale=224,
                  flip=flip)
    model = train.build_model(c, 5)
    variables = models.init_variables(model, jax.random.key(3), 224)
    return weights.Net(model=model, variables=variables,
                       meta=weights.model_meta(model, c.data, range(5)))


def jpeg(size=(224, 224), seed=0):
    from PIL import Image
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_test_time_flips_follow_the_weights_recipe_and_no_flip_dense_is_the_centre_crop():
    raw = jpeg()
    no_flip_net, flip_net = small_224_net(False), small_224_net(True)
    assert not no_flip_net.flip and flip_net.flip
    follows = views.posterior(no_flip_net, raw, "dense", [224])
    assert np.allclose(follows, views.posterior(no_flip_net, raw, "dense", [224], flip=False))
    # Q = 224 on a 224x224 image: the dense map is 1x1 and equals the centre crop's logits
    center = views.posterior(flip_net, raw, "center", [224])
    np.testing.assert_allclose(views.posterior(flip_net, raw, "dense", [224], flip=False),
                               center, rtol=1e-5, atol=1e-7)
    flipped = views.posterior(flip_net, raw, "dense", [224])  # follows: flip averaged
    mirror = preprocess.eval_example(raw, flip_net.d, scale=224, crop=True).numpy()[:, ::-1]
    expected = (center + flip_net.softmax(mirror[None])[0]) / 2
    np.testing.assert_allclose(flipped, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(flipped, center)
    multicrop = views.multicrop_batch(np.zeros((256, 256, 3)), 224, flip=False)
    assert len(multicrop) == 25


def test_b_5x5_is_sec_4_1s_shallow_net():
    # independent count: B's channel plan with one 5x5 conv per block, 3 input channels
    plan, cin, convs = [64, 128, 256, 512, 512], 3, 0
    for cout in plan:
        convs += 5 * 5 * cin * cout + cout
        cin = cout
    fcs = (512 * 7 * 7 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    s = summary.summarize("B-5x5", num_classes=1000, image_size=224)
    assert s["params"] == convs + fcs
    assert models.canonical_name("vgg13_5x5_bn") == "vgg13_5x5_bn"
    table = models.layer_table("B-5x5")
    assert [l.kernel for l in table if l.kind == "conv"] == [5] * 5
    m = models.create_model("B-5x5", num_classes=3, width=1 / 16, fc_widths=(8, 8),
                            classifier_pool=1)
    v = models.init_variables(m, jax.random.key(0), 32)
    assert m.apply(v, np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 3)
    out = subprocess.run([sys.executable, "train.py", "--workdir=" + os.path.join(
        "/tmp", f"b5x5_{os.getpid()}"), "--config.model.arch=B-5x5",
        "--config.model.width=0.0625", "--config.model.fc_widths=(16, 16)",
        "--config.train.max_steps=2", "--config.train.progress_bar=False"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "top-1 accuracy" in out.stdout


def test_pool_ceil_is_caffes_ceil_mode():
    import torch
    x = np.abs(np.random.default_rng(0).normal(size=(2, 9, 11, 4))).astype(np.float32)
    ours = np.asarray(models.max_pool(x, ceil=True))
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2, 2,
                                         ceil_mode=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert models.max_pool(x).shape == (2, 4, 5, 4)  # floor, as torchvision
    shapes = {}
    for ceil in (False, True):
        m = models.create_model("A", num_classes=3, width=1 / 16, fc_widths=(8, 8),
                                pool_ceil=ceil)
        v = models.init_variables(m, jax.random.key(0), 224)
        img = np.zeros((1, 256, 341, 3), np.float32)
        shapes[ceil] = models.extract(m, v, img, ("pool5",), dense=True)["pool5"].shape[1:3]
        assert tuple(models.dense_valid_size(np.array([256, 341]), 7, ceil)) == (
            shapes[ceil][0] - 6, shapes[ceil][1] - 6)
    assert shapes == {False: (8, 10), True: (8, 11)}  # the paper's Caffe: 8x11


def test_paper_descriptors_are_unit_length_stack_scales_and_skip_broken_images(tmp_path, caplog):
    from conftest import write_image_folder
    from vgg_jax import embed, input_pipeline
    c = load_config()
    c.model.update(width=1 / 16, fc_widths=(16, 16))
    model = train.build_model(c, 2)
    net = weights.Net(model=model, variables=models.init_variables(model, jax.random.key(0), 32),
                      meta=weights.model_meta(model, c.data, ["cat", "dog"]))
    write_image_folder(str(tmp_path / "f"), per_class=3, size=(40, 52))
    (tmp_path / "f" / "cat" / "broken.png").write_bytes(b"not an image")
    source = input_pipeline.make_source(str(tmp_path / "f"), "test")
    with caplog.at_level("WARNING"):
        avg, labels, skipped = embed.paper_descriptors(net, source, (32, 64), batch_size=4)
    broken = str(tmp_path / "f" / "cat" / "broken.png")
    assert skipped == [broken] and f"failed to decode: {broken}" in caplog.text
    assert avg.shape == (6, 16) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1.0, rtol=1e-5)
    stacked, _, _ = embed.paper_descriptors(net, source, (32, 64), aggregate="stack", batch_size=4)
    assert stacked.shape == (6, 32)
    # the stacked scales, summed, point exactly where their average does
    halves = stacked[:, :16] + stacked[:, 16:]
    cos = np.sum(halves / np.linalg.norm(halves, axis=1, keepdims=True) * avg, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_one_centre_crop_for_evaluate_predict_embed_and_validation(tmp_path):
    """A non-square image gets the same pixels from the four paths that take a centre crop:
    predict (Net.pixels), evaluate's 'center' view, embed's and training-time validation's
    batches; they equal an independent rescale-and-crop (smallest side to Q = 32, the
    small recipe's crop, antialiased bilinear; torchvision's centre offsets)."""
    import tensorflow as tf
    from PIL import Image
    from vgg_jax import eval_data, evaluate, input_pipeline
    c = load_config()
    c.model.update(width=1 / 16, fc_widths=(16, 16))
    model = train.build_model(c, 1)
    net = weights.Net(model=model, variables=models.init_variables(model, jax.random.key(0), 32),
                      meta=weights.model_meta(model, c.data, ["a"]))
    image = np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "f" / "a")
    path = str(tmp_path / "f" / "a" / "0.png")
    Image.fromarray(image).save(path)
    raw = open(path, "rb").read()

    predict = net.pixels(path)
    center = views.Rescaler([net], "center", evaluate.default_scales(net.d))(tf.constant(raw))[0]
    source = input_pipeline.make_source(str(tmp_path / "f"), "")
    embed_batch = next(eval_data.eval_batches(source, net.d, 1))["image"][0]
    validation = next(eval_data.eval_batches(source, c.data, 1))["image"][0]
    # 40x57 -> 32x45 (the long side int(32 * 57 / 40)); offset round((45 - 32) / 2) = 6
    resized = tf.image.resize(image.astype(np.float32), (32, 45), antialias=True).numpy()
    expected = np.clip(np.round(resized), 0, 255).astype(np.uint8)[:, 6:38]
    for got in (predict, np.asarray(center), embed_batch, validation):
        np.testing.assert_array_equal(got, expected)


def test_torchvision_weights_see_what_torchvisions_own_transform_feeds_them(tmp_path):
    """The real torchvision: a VGG-16-BN module (random weights, random BatchNorm
    statistics), converted; real photos (scikit-learn's) cut to odd sizes; its weights
    enum's own eval transform against what vgg_jax feeds the converted net."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from conftest import import_torchvision
    from vgg_jax import convert
    import_torchvision()
    from torchvision.models import VGG16_BN_Weights, vgg16_bn
    torch.manual_seed(0)
    tv = vgg16_bn(weights=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    kw = convert.infer_model_kwargs(sd, "vgg16_bn")
    net = weights.Net(model=models.create_model(**kw), variables=convert.from_torch(sd, "vgg16_bn"),
                      meta=convert.weights_meta(kw, "torchvision"))
    transform = VGG16_BN_Weights.IMAGENET1K_V1.transforms()
    china, flower = load_sample_images().images
    paths = []
    for i, photo in enumerate((china[:301, :455], flower[13:400, 21:334])):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(photo).save(paths[-1], quality=90)
    for path in paths:
        want = transform(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
        ours = net.image(path)
        assert ours.shape == want.shape == (224, 224, 3)
        assert np.abs(ours - want).max() <= 0.05, np.abs(ours - want).max()
        with torch.no_grad():
            want_logits = tv(torch.from_numpy(want).permute(2, 0, 1)[None]).numpy()[0]
        logits = np.asarray(net.logits(net.pixels(path)[None]))[0]
        rel = np.abs(logits - want_logits).max() / np.abs(want_logits).max()
        assert rel <= 1e-4, rel
