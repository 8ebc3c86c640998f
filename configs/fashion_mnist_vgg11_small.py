"""The `fashion_mnist_vgg11_small` config. Its values live in vgg_jax/configs/fashion_mnist_vgg11_small.py, which
ships with the package (`vgg-jax train --config fashion_mnist_vgg11_small`); this file is the repository's path
to it (`python train.py --config configs/fashion_mnist_vgg11_small.py`)."""
from vgg_jax.configs.fashion_mnist_vgg11_small import get_config  # noqa: F401
