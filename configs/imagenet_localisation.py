"""The `imagenet_localisation` config. Its values live in
vgg_jax/configs/imagenet_localisation.py, which ships with the package (`vgg-jax train
--config imagenet_localisation`); this file is the repository's path to it (`python train.py
--config configs/imagenet_localisation.py`)."""
from vgg_jax.configs.imagenet_localisation import get_config  # noqa: F401
