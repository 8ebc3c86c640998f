"""Training from the command line: `vgg-jax train` (installed) and the repository's
`python train.py`, the same code.

`--config NAME[:ARG]` names a packaged config (vgg_jax/configs: `default`, `imagenet:D,256`,
`fashion_mnist_vgg11_small`, ...), `--config PATH.py[:ARG]` any config file; `--config.KEY=VALUE`
overrides a field. With no arguments: the `default` config (VGG-11-BN, quarter width, on the
bundled digits dataset) in ./workdir/default. Running again with the same workdir resumes.
A mistake in the command line or the config is one line, `PROG: error: ...`, and exit
status 2; JAX's persistent compilation cache makes a repeated run start faster
(train.compile_cache or $VGG_JAX_COMPILE_CACHE moves it; 'off' turns it off).

Importing this module changes nothing; `main` owns its process (TensorFlow's log level, the
XLA:CPU options, absl's flags) like every entry point.
"""
from __future__ import annotations

import logging
import os
import re
import sys

USAGE = """usage: {prog} [--config NAME[:ARG] | --config FILE.py[:ARG]] [--workdir DIR]
       [--config.KEY=VALUE ...]

Train a VGG; running the same command again resumes from the workdir's last checkpoint.

  --config      a packaged config by name, optionally with its argument (imagenet:D,256),
                or a config file of your own (default: default)
                packaged: {names}
  --workdir     checkpoints, metrics.jsonl, TensorBoard events: a local folder or
                gs://BUCKET/PATH (default: workdir/default)
  --config.KEY=VALUE   any field of the config (--config.optim.batch_size=64)

A mistake is one line and exit status 2."""
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "default.py")


def config_names() -> list[str]:
    """The packaged configs, by the name `--config` takes."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and not f.startswith("_"))


def resolve_config(value: str) -> str:
    """`--config`'s value as the file ml_collections loads: a packaged config's name
    (NAME or NAME:ARG) becomes its path; a path (or anything else) is left as given."""
    name, sep, arg = value.partition(":")
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and not os.path.exists(name):
        path = os.path.join(CONFIG_DIR, f"{name}.py")
        if os.path.isfile(path):
            return path + sep + arg
    return value


def resolve_argv(argv: list[str]) -> list[str]:
    """argv with `--config NAME[:ARG]` / `--config=NAME[:ARG]` given as the config's path."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve_config(a.split("=", 1)[1])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def main(argv: list[str] | None = None, prog: str = "vgg-jax train") -> None:
    """Parse argv (sys.argv[1:] by default) and train; exits the process like absl's app."""
    from vgg_jax import runtime
    runtime.quiet_tensorflow()  # before anything loads TensorFlow
    runtime.configure_cpu()  # before JAX starts a backend
    from absl import app, flags
    from ml_collections import config_flags

    argv = resolve_argv(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "--helpshort") for a in argv):  # absl's would list no flag
        print(USAGE.format(prog=prog, names=", ".join(config_names())))
        sys.exit(0)

    def usage_error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def explain(error: Exception):
        with runtime.tensorflow_import():  # it and the default config it may read load TF
            from vgg_jax import configuration
            message = configuration.explain_flag_error(argv, error, DEFAULT_CONFIG,
                                                       names=config_names())
        usage_error(message)

    try:  # ml_collections reads the config file and the --config.KEY overrides right here
        with runtime.tensorflow_import():  # a config that loads TensorFlow: quiet, no Keras
            config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                            "Training configuration: a packaged config's name "
                                            f"({', '.join(config_names())}) or a file, "
                                            "optionally :ARG.", lock_config=True)
    except Exception as e:  # noqa: BLE001 (an unknown key, a config file that fails to load)
        explain(e)
    flags.DEFINE_string("workdir", os.path.join("workdir", "default"),
                        "Checkpoints, metrics.jsonl and TensorBoard events go here "
                        "(a local folder or gs://BUCKET/PATH).")

    def parse_flags(args):
        try:
            # the config file loads here, and with it TensorFlow (quiet, without Keras)
            with runtime.tensorflow_import():
                return flags.FLAGS(args)
        except Exception as e:  # noqa: BLE001 (absl's flags.Error: a wrong type, a missing file)
            explain(e)

    def run(args):
        if len(args) > 1:
            usage_error(f"unexpected arguments: {' '.join(args[1:])}")
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
            sys.exit(f"{prog}: error: {e}")
        if "top1_acc" in result and config.model.get("box_head"):
            print(f"{result['split']} localisation accuracy (centre crop, the true class's "
                  f"box, IoU > 0.5): {100 * result['top1_acc']:.2f}% (localisation error "
                  f"{100 * result['top1_err']:.2f}%) on {int(result['count'])} images "
                  f"after {result['step']} steps")
        elif "top1_acc" in result:
            print(f"{result['split']} top-1 accuracy: {100 * result['top1_acc']:.2f}% "
                  f"(top-1 error {100 * result['top1_err']:.2f}%, top-5 error "
                  f"{100 * result['top5_err']:.2f}%) on {int(result['count'])} images "
                  f"after {result['step']} steps")
        from vgg_jax.eval_data import skipped_line
        for what, names in (("training", result.get("train_skipped_images")),
                            (result.get("split", ""), result.get("skipped_images"))):
            if names:
                print(skipped_line(names, what).lstrip("\n"))
        runtime.skip_exit_collection()  # the run is saved and closed: a quick exit

    app.run(run, argv=[prog, *argv], flags_parser=parse_flags)
