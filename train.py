"""Train a VGG: `python train.py --config configs/NAME.py --workdir DIR [--config.field=value]`.

With no arguments: the default config (VGG-11-BN, quarter width, on the bundled digits
dataset) in ./workdir/default. Running again with the same workdir resumes.
A mistake in the command line or the config is one line, `train.py: error: ...`, and exit
status 2; JAX's persistent compilation cache makes a repeated run start faster
(train.compile_cache or $VGG_JAX_COMPILE_CACHE moves it; 'off' turns it off).
"""
import logging
import os
import sys

from vgg_jax import runtime  # noqa: I001 (first: quiets TensorFlow before anything loads it)

# This script owns its process: TensorFlow's log level and the XLA:CPU options are set
# here, before JAX starts a backend (importing vgg_jax alone sets neither).
runtime.quiet_tensorflow()
runtime.configure_cpu()
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")


def usage_error(message: str):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def explain(error: Exception):
    with runtime.tensorflow_import():  # it and the default config it may read load TF
        from vgg_jax import configuration
        message = configuration.explain_flag_error(sys.argv[1:], error, DEFAULT_CONFIG)
    usage_error(message)


try:  # ml_collections reads the config file and the --config.KEY overrides right here
    with runtime.tensorflow_import():  # a config that loads TensorFlow: quiet, no Keras
        config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                        "Training configuration file.", lock_config=True)
except Exception as e:  # an unknown key (AttributeError), a config file that fails to load
    explain(e)
flags.DEFINE_string("workdir", os.path.join("workdir", "default"),
                    "Checkpoints, metrics.jsonl and TensorBoard events go here.")


def parse_flags(argv):
    try:
        # the config file loads here, and with it TensorFlow (quiet, without Keras)
        with runtime.tensorflow_import():
            return flags.FLAGS(argv)
    except Exception as e:  # absl's flags.Error: a value of the wrong type, a missing file
        explain(e)


def main(argv):
    if len(argv) > 1:
        usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/tfds chatter
    logging.getLogger("vgg_jax").setLevel(logging.INFO)
    with runtime.tensorflow_import():  # quiet, and without Keras (vgg_jax.runtime)
        from vgg_jax import train
    from vgg_jax.errors import UserError
    try:
        config = flags.FLAGS.config
        config.train  # ml_collections reports a config file it could not load on first use
    except OSError as e:
        explain(e)
    try:
        runtime.enable_compile_cache(config.train.compile_cache)
        result = train.train_and_evaluate(config, flags.FLAGS.workdir)
    except UserError as e:
        usage_error(str(e))
    except FloatingPointError as e:  # diverged: not a usage error
        sys.exit(f"train.py: error: {e}")
    if "top1_acc" in result:
        print(f"{result['split']} top-1 accuracy: {100 * result['top1_acc']:.2f}% "
              f"(top-1 error {100 * result['top1_err']:.2f}%, top-5 error "
              f"{100 * result['top5_err']:.2f}%) on {int(result['count'])} images "
              f"after {result['step']} steps")
    from vgg_jax.eval_data import skipped_line
    for what, names in (("training", result.get("train_skipped_images")),
                        (result.get("split", ""), result.get("skipped_images"))):
        if names:
            print(skipped_line(names, what).lstrip("\n"))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
