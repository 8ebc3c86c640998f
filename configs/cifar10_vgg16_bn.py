"""The `cifar10_vgg16_bn` config. Its values live in vgg_jax/configs/cifar10_vgg16_bn.py, which
ships with the package (`vgg-jax train --config cifar10_vgg16_bn`); this file is the repository's path
to it (`python train.py --config configs/cifar10_vgg16_bn.py`)."""
from vgg_jax.configs.cifar10_vgg16_bn import get_config  # noqa: F401
