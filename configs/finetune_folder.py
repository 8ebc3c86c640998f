"""The `finetune_folder` config. Its values live in vgg_jax/configs/finetune_folder.py, which
ships with the package (`vgg-jax train --config finetune_folder`); this file is the repository's path
to it (`python train.py --config configs/finetune_folder.py`)."""
from vgg_jax.configs.finetune_folder import get_config  # noqa: F401
