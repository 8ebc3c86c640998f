"""Every shipped config loads and validates; the ImageNet recipe carries the paper's numbers."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from vgg_jax import train

sys.path.insert(0, ROOT)
from vgg_jax.configs import (cifar10_vgg16_bn, default, digits_localisation,  # noqa: E402
                             fashion_mnist_depth, fashion_mnist_vgg11_small, imagenet,
                             imagenet_localisation)


@pytest.mark.parametrize("config", [
    default.get_config(), cifar10_vgg16_bn.get_config(), fashion_mnist_vgg11_small.get_config(),
    imagenet.get_config("A,256"), imagenet.get_config("D,384"), imagenet.get_config("E,256-512"),
    *(fashion_mnist_depth.get_config(a) for a in ("A", "A-LRN", "B", "C", "D", "E")),
    digits_localisation.get_config("SCR"), digits_localisation.get_config("PCR"),
    imagenet_localisation.get_config("SCR,256"), imagenet_localisation.get_config("PCR,384,fc"),
])
def test_shipped_configs_validate(config):
    if config.train.init_from_required:  # a fine-tuning stage: run as the README shows
        config.train.init_from = "runs/parent"
    train.validate(config)


def test_imagenet_recipe_has_the_papers_numbers():
    c = imagenet.get_config("D,256")
    assert (c.optim.batch_size, c.optim.momentum, c.optim.weight_decay) == (256, 0.9, 5e-4)
    assert (c.optim.learning_rate, c.optim.schedule, c.optim.plateau_max_decays) == (1e-2, "paper", 3)
    assert (c.model.dropout_rate, c.model.fc_widths, c.data.image_size) == (0.5, (4096, 4096), 224)
    assert (c.data.s_min, c.data.s_max, c.train.num_epochs) == (256, 256, 74)
    assert imagenet.get_config("D,384").optim.learning_rate == 1e-3
    j = imagenet.get_config("D,256-512")
    assert (j.data.s_min, j.data.s_max, j.data.eval_scale) == (256, 512, 384)
    assert imagenet.get_config("A,256").model.init_scheme == "paper"


# What each recipe's source fixes, written out from the source itself (not from the
# config): the paper's Sec. 3.1 (shared/PAPER.md), d2l's VGG chapter and its train_ch6,
# and the CIFAR-10 script the seed notes link (04.VGG.py).
SOURCES = {
    "imagenet D,256 (paper Sec. 3.1)": (lambda: imagenet.get_config("D,256"), {
        "optim.batch_size": 256, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
        "optim.weight_decay_mode": "coupled", "optim.learning_rate": 1e-2,
        "optim.schedule": "paper", "optim.plateau_max_decays": 3, "optim.warmup_epochs": 0,
        "optim.nesterov": False, "optim.grad_clip_norm": 0.0, "model.dropout_rate": 0.5,
        "model.fc_widths": (4096, 4096), "model.width": 1.0, "model.classifier_pool": 7,
        "data.image_size": 224, "data.recipe": "paper", "data.s_min": 256, "data.s_max": 256,
        "data.flip": True, "data.colour_pca": True, "data.normalization": "paper",
        "train.num_epochs": 74}),
    "imagenet D,384 (paper Sec. 3.1)": (lambda: imagenet.get_config("D,384"), {
        "optim.learning_rate": 1e-3, "data.s_min": 384, "data.s_max": 384}),
    "fashion_mnist (d2l VGG chapter, train_ch6)": (fashion_mnist_vgg11_small.get_config, {
        "model.arch": "vgg11", "model.width": 0.25, "model.fc_widths": (4096, 4096),
        "model.classifier_pool": 7, "model.dropout_rate": 0.5, "model.init_scheme": "glorot",
        "model.bias_init": "torch", "data.dataset": "fashion_mnist", "data.channels": 1, "data.image_size": 224,
        "data.pad": 0, "data.flip": False, "data.colour_pca": False,
        "data.normalization": "custom", "data.mean": (0.0,), "data.std": (255.0,),
        "optim.batch_size": 128, "optim.learning_rate": 0.05, "optim.momentum": 0.0,
        "optim.nesterov": False, "optim.weight_decay": 0.0, "optim.schedule": "constant",
        "optim.warmup_epochs": 0, "optim.grad_clip_norm": 0.0, "train.num_epochs": 10,
        "train.eval_every_epochs": 1}),
    "fashion_mnist depth (paper Sec. 3.1, Table 3, small scale)": (
        lambda: fashion_mnist_depth.get_config("E"), {
            "model.arch": "E", "model.init_scheme": "glorot", "model.dropout_rate": 0.5,
            "optim.momentum": 0.9, "optim.nesterov": False, "optim.weight_decay": 5e-4,
            "optim.weight_decay_mode": "coupled", "optim.learning_rate": 1e-2,
            "optim.schedule": "step", "optim.warmup_epochs": 0, "optim.grad_clip_norm": 0.0,
            "data.flip": True, "data.colour_pca": False, "data.dataset": "fashion_mnist",
            "data.mean": (72.94,), "data.std": (90.02,)}),
    "canvas digits localisation (Appendix A, small scale)": (
        lambda: digits_localisation.get_config("PCR"), {
            "model.box_head": "pcr", "data.flip": True, "optim.momentum": 0.9,
            "optim.weight_decay": 5e-4, "optim.weight_decay_mode": "coupled",
            "eval.protocol": "center", "data.dataset": "vgg_digits_canvas"}),
    # Appendix A: as the classification net of the same scale, but a box head, one scale,
    # lr 1e-3, started from that net with the box layer new; ',fc' trains fc6-fc8 only
    "imagenet localisation PCR,384 (paper Appendix A)": (
        lambda: imagenet_localisation.get_config("PCR,384"), {
            "model.arch": "D", "model.box_head": "pcr", "model.dropout_rate": 0.5,
            "model.fc_widths": (4096, 4096), "model.classifier_pool": 7,
            "data.dataset": "imagenet2012_localisation", "data.image_size": 224,
            "data.s_min": 384, "data.s_max": 384, "data.eval_scale": 384,
            "data.flip": True, "data.colour_pca": True, "data.recipe": "paper",
            "optim.learning_rate": 1e-3, "optim.batch_size": 256, "optim.momentum": 0.9,
            "optim.weight_decay": 5e-4, "optim.freeze": (),
            "train.init_from_required": "the S=384 D classification run",
            "train.init_exclude": ("fc8",), "eval.protocol": "center"}),
    "imagenet localisation SCR,256,fc (paper Appendix A, Table 8)": (
        lambda: imagenet_localisation.get_config("SCR,256,fc"), {
            "model.box_head": "scr", "data.s_min": 256, "data.s_max": 256,
            "optim.learning_rate": 1e-3, "optim.freeze": ("convs",)}),
    "cifar10 (04.VGG.py)": (cifar10_vgg16_bn.get_config, {
        "model.arch": "vgg16_bn", "model.width": 1.0, "model.fc_widths": (4096, 4096),
        "model.classifier_pool": 7, "model.dropout_rate": 0.5, "data.image_size": 32,
        "data.pad": 4, "data.flip": True, "data.colour_pca": False,
        "data.mean": (0.4914 * 255, 0.4822 * 255, 0.4465 * 255),
        "data.std": (0.2023 * 255, 0.1994 * 255, 0.2010 * 255),
        "optim.batch_size": 128, "optim.learning_rate": 0.001, "optim.momentum": 0.9,
        "optim.nesterov": False, "optim.weight_decay": 5e-4, "optim.weight_decay_mode": "coupled",
        "optim.decay_biases_and_bn": True, "optim.schedule": "step", "optim.step_epochs": (30,),
        "optim.warmup_epochs": 0, "optim.grad_clip_norm": 0.0, "train.num_epochs": 50,
        "train.eval_every_epochs": 5}),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_recipe_configs_set_every_value_their_source_fixes(name):
    make, fixed = SOURCES[name]
    c = make()
    for key, value in fixed.items():
        section, field = key.split(".")
        got = c[section][field]
        if isinstance(value, tuple):
            assert tuple(got) == pytest.approx(value), key
        else:
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


@pytest.mark.parametrize("arg", ["SCR,512", "BOX,256", "PCR,256,convs"])
def test_imagenet_localisation_takes_only_the_papers_variants(arg):
    with pytest.raises(ValueError, match=r"imagenet_localisation takes SCR\|PCR,S\[,fc\] "
                       r"with S in \(256, 384\)"):
        imagenet_localisation.get_config(arg)


def test_imagenet_config_without_the_data_says_where_the_tars_go(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/imagenet.py:A,256",
                          f"--workdir={tmp_path}/w", f"--config.data.data_dir={tmp_path}/tfds"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in out.stderr
    assert os.path.join(f"{tmp_path}/tfds", "downloads", "manual") in out.stderr
