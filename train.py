"""Train a VGG: `python train.py --config configs/NAME.py --workdir DIR [--config.field=value]`.

With no arguments: the default config (VGG-11-BN, quarter width, on the bundled digits
dataset) in ./workdir/default. Running again with the same workdir resumes.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "default.py"),
                                "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", os.path.join("workdir", "default"),
                    "Checkpoints, metrics.jsonl and TensorBoard events go here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/tfds chatter
    logging.getLogger("vgg_jax").setLevel(logging.INFO)
    from vgg_jax import train
    try:
        result = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")
    if "top1_acc" in result:
        print(f"{result['split']} top-1 accuracy: {100 * result['top1_acc']:.2f}% "
              f"(top-1 error {100 * result['top1_err']:.2f}%, top-5 error "
              f"{100 * result['top5_err']:.2f}%) on {int(result['count'])} images "
              f"after {result['step']} steps")


if __name__ == "__main__":
    app.run(main)
