"""The `default` config. Its values live in vgg_jax/configs/default.py, which
ships with the package (`vgg-jax train --config default`); this file is the repository's path
to it (`python train.py --config configs/default.py`)."""
from vgg_jax.configs.default import get_config  # noqa: F401
