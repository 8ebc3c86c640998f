"""Every shipped config loads and validates; the ImageNet recipe carries the paper's numbers."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from vgg_jax import train

sys.path.insert(0, ROOT)
from configs import cifar10_vgg16_bn, default, fashion_mnist_vgg11_small, imagenet  # noqa: E402


@pytest.mark.parametrize("config", [
    default.get_config(), cifar10_vgg16_bn.get_config(), fashion_mnist_vgg11_small.get_config(),
    imagenet.get_config("A,256"), imagenet.get_config("D,384"), imagenet.get_config("E,256-512"),
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


def test_imagenet_config_without_the_data_says_where_the_tars_go(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/imagenet.py:A,256",
                          f"--workdir={tmp_path}/w", f"--config.data.data_dir={tmp_path}/tfds"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in out.stderr
    assert os.path.join(f"{tmp_path}/tfds", "downloads", "manual") in out.stderr
