"""Train a VGG: `python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.field=value]`.

The repository's entry onto `vgg-jax train` (vgg_jax/train_cmd.py, which documents the
flags): the same code, with `train.py` in its messages.
"""
from vgg_jax import train_cmd

if __name__ == "__main__":
    train_cmd.main(prog="train.py")
