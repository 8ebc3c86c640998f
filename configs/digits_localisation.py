"""The `digits_localisation` config. Its values live in vgg_jax/configs/digits_localisation.py,
which ships with the package (`vgg-jax train --config digits_localisation:SCR`); this file is
the repository's path to it (`python train.py --config configs/digits_localisation.py:SCR`)."""
from vgg_jax.configs.digits_localisation import get_config  # noqa: F401
