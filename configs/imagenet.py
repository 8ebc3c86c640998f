"""The `imagenet` config. Its values live in vgg_jax/configs/imagenet.py, which
ships with the package (`vgg-jax train --config imagenet`); this file is the repository's path
to it (`python train.py --config configs/imagenet.py`)."""
from vgg_jax.configs.imagenet import get_config  # noqa: F401
