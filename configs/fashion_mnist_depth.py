"""The `fashion_mnist_depth` config. Its values live in vgg_jax/configs/fashion_mnist_depth.py, which
ships with the package (`vgg-jax train --config fashion_mnist_depth`); this file is the repository's path
to it (`python train.py --config configs/fashion_mnist_depth.py`)."""
from vgg_jax.configs.fashion_mnist_depth import get_config  # noqa: F401
