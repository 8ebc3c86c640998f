"""`vgg-jax`: one command, a sub-command per job. Each sub-command's work is a function
with keyword arguments in the module that owns the idea (`run="module:function"`); this
file parses the arguments and passes each one by name, so an option the function does not
take fails loudly instead of being ignored."""
from __future__ import annotations

import argparse
import importlib
import sys

from vgg_jax import choices, runtime
from vgg_jax.errors import UserError


WEIGHTS_HELP = ("weights directory, train workdir, or published weights by name "
                "(torchvision:vgg16, keras:vgg19: `vgg-jax published` lists them)")


# One meaning each, in every sub-command that takes them:
BATCH_HELP = "views (images, crops) per batch on this process, rounded up to its devices"
LIMIT_HELP = ("about the first N images in all: ceil(N / processes) of each process's part "
              "of the split")


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _checked(kind, ok, rule: str):
    """An argparse type: `kind` (int or float) with `ok(value)`, else the one-line `rule`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    return parse


positive = _checked(int, lambda v: v >= 1, "at least 1")  # counts, sizes, batch sizes
non_negative = _checked(int, lambda v: v >= 0, "at least 0")
positive_float = _checked(float, lambda v: v > 0, "more than 0")


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 256 or 256,384,512, "
                                         f"got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be at least 1, got {text!r}")
    return values


def _summary(sub):
    p = sub.add_parser("summary", help="per-layer table: shapes, params, FLOPs, memory, RF")
    p.add_argument("arch")
    p.add_argument("--num-classes", type=positive, default=1000)
    p.add_argument("--image-size", type=positive, default=224)
    p.add_argument("--in-channels", type=positive, default=3)
    p.add_argument("--width", type=positive_float, default=1.0)
    p.add_argument("--json", dest="json_output", action="store_true",
                   help="print one JSON object")
    p.set_defaults(run="vgg_jax.summary:main")


def _convert(sub):
    p = sub.add_parser("convert", help="torch state_dict <-> vgg_jax weights directory")
    p.add_argument("--arch", default=None,
                   help="architecture of --from-torch weights; with --from, taken from the "
                   "weights directory (a different one is refused)")
    p.add_argument("--from-torch", dest="torch_file",
                   help=".pth / .safetensors / .npz torch state_dict")
    p.add_argument("--from-keras", dest="keras_file",
                   help="Keras VGG16 / VGG19 file (.h5, .keras): the paper's released weights")
    p.add_argument("--from-onnx", dest="onnx_file", help="ONNX graph of a VGG")
    p.add_argument("--no-top", action="store_true",
                   help="the convolutions only (a backbone; any head in the file is ignored)")
    p.add_argument("--out", help="weights directory to write (with --from-*)")
    p.add_argument("--from", dest="from_dir", help="vgg_jax weights directory or train workdir")
    p.add_argument("--to-torch", dest="torch_out",
                   help="torch state_dict file to write (.pth or .safetensors)")
    p.add_argument("--preprocessing", default=None, choices=choices.NORMALIZATIONS,
                   help="pixel convention the weights expect (default: caffe for Keras "
                   "files, torchvision otherwise)")
    p.set_defaults(run="vgg_jax.convert_cmd:main")


def _predict(sub):
    p = sub.add_parser("predict", help="top-5 classes for images")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=positive, default=5)
    p.add_argument("--dense", action="store_true",
                   help="the fully-convolutional net over the whole image at --q, without "
                   "the flip averaging of `evaluate --protocol dense`")
    p.add_argument("--q", type=positive, default=256, help="test scale Q for --dense")
    p.set_defaults(run="vgg_jax.predict:predict")


def _localize(sub):
    p = sub.add_parser("localize", help="a box net's five boxes drawn on images (Appendix A)")
    p.add_argument("--weights", required=True, help="a box net: " + WEIGHTS_HELP)
    p.add_argument("--classifier", default=None,
                   help="a classification net of the same classes: its five best classes "
                   "are the guesses and its scores rate each box")
    p.add_argument("--ensemble", type=comma_list, default=(),
                   help="more box nets whose boxes are pooled with --weights' (the paper's "
                   "fusion)")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="folder for the pictures (OUT/NAME.png)")
    p.add_argument("--scales", type=int_list, default=(),
                   help="Q or Q1,Q2,... (default: the box net's test scale)")
    p.add_argument("--top", type=positive, default=5)
    p.add_argument("--json", dest="json_output", action="store_true")
    p.set_defaults(run="vgg_jax.localise:localize")


def _features(sub):
    p = sub.add_parser("features", help="a named layer's activations for images")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--layer", default="fc7")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help=".npy file")
    p.set_defaults(run="vgg_jax.predict:features")


def _prepare(sub):
    p = sub.add_parser("prepare", help="prepare a TFDS dataset offline: the bundled digits, "
                       "one from archives you downloaded (imagenet2012), or mnist / "
                       "fashion_mnist from their four IDX files")
    p.add_argument("dataset", nargs="?", default="vgg_digits")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None,
                   help="where the downloaded archives or IDX files are (default: "
                   "DATA_DIR/downloads/manual)")
    p.set_defaults(run="vgg_jax.prepared:main_prepare")


def _stats(sub):
    p = sub.add_parser("dataset-stats", help="mean RGB and RGB PCA of a training split")
    p.add_argument("dataset", help="TFDS name or image folder")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-images", type=positive, default=10000)
    p.set_defaults(run="vgg_jax.eval_data:main_stats")


def _evaluate(sub):
    p = sub.add_parser("evaluate", help="the paper's test protocols (Sec. 3.2)")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--ensemble", type=comma_list, default=(),
                   help="comma-separated weights dirs: average soft-max")
    p.add_argument("--data", required=True, help="TFDS name or image folder")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--protocol", default="center", choices=choices.PROTOCOLS)
    p.add_argument("--scales", type=int_list, default=(),
                   help="Q or Q1,Q2,... (default: the weights' test scale: the crop size "
                   "for the small recipe, else their data.eval_scale)")
    p.add_argument("--crop", type=positive, default=None,
                   help="crop size of center / multicrop views (default: the model's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with horizontal flips (default: as the weights were "
                   "trained, from their meta.json)")
    p.add_argument("--batch-size", type=positive, default=64, help=BATCH_HELP +
                   " (dense views: as many pixels)")
    p.add_argument("--limit", type=positive, default=None, help=LIMIT_HELP)
    p.add_argument("--json", dest="json_output", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (jax.distributed.initialize): each "
                   "evaluates its shard, counts are summed")
    p.add_argument("--coordinator-address", default=None, help="with --distributed: host:port")
    p.add_argument("--num-processes", type=positive, default=None)
    p.add_argument("--process-id", type=non_negative, default=None)
    p.add_argument("--task", default="classification", choices=("classification", "localisation"),
                   help="localisation: a box net's error (Appendix A): --protocol center "
                   "(Table 8) or dense (Table 9; --ensemble pools several nets' boxes)")
    p.add_argument("--classifier", default=None,
                   help="with --task localisation: a classification net whose five best "
                   "classes are the guesses (default: the box of the true class only)")
    p.set_defaults(run="vgg_jax.evaluate:main")


def _embed(sub):
    p = sub.add_parser("embed", help="a layer's embeddings (fc7: 4096-d) for a whole dataset")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--data", required=True, help="TFDS name or image folder")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--layer", default="fc7")
    p.add_argument("--no-pool", action="store_true",
                   help="keep conv/pool maps (N, H, W, C) instead of averaging over space")
    p.add_argument("--protocol", default="center", choices=choices.EMBED_PROTOCOLS,
                   help="center: the centre crop; paper: Appendix B's descriptors (dense "
                   "fc7 over --scales, flip-averaged, L2-normalised)")
    p.add_argument("--scales", type=int_list, default=(),
                   help="with --protocol paper: Q1,Q2,... (default: from the weights' "
                   "training scales, as Sec. 3.2 derives Q from S)")
    p.add_argument("--aggregate", default="average", choices=choices.AGGREGATES,
                   help="with --protocol paper: how the scales are combined")
    p.add_argument("--batch-size", type=positive, default=64, help=BATCH_HELP)
    p.add_argument("--limit", type=positive, default=None, help=LIMIT_HELP)
    p.add_argument("--out", required=True, help=".npz: embeddings, labels, class_names")
    p.set_defaults(run="vgg_jax.embed:main")


def _transfer(sub):
    p = sub.add_parser("transfer", help="Appendix B: linear SVM on the net's descriptors of "
                       "another dataset")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--data", required=True, help="TFDS name or image folder")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--scales", type=int_list, default=(),
                   help="Q1,Q2,... (default: from the weights' training scales, as Sec. "
                   "3.2 derives Q from S; printed)")
    p.add_argument("--aggregate", default="average", choices=choices.AGGREGATES)
    p.add_argument("--c", type=positive_float, default=1.0, help="the SVM's C")
    p.add_argument("--batch-size", type=positive, default=32, help=BATCH_HELP)
    p.add_argument("--limit", type=positive, default=None, help=LIMIT_HELP + ", per split")
    p.add_argument("--json", dest="json_output", action="store_true")
    p.set_defaults(run="vgg_jax.transfer:main")


def _plot_embeddings(sub):
    p = sub.add_parser("plot-embeddings", help="2-D PCA / t-SNE scatter of `embed` output")
    p.add_argument("embeddings", help=".npz written by `vgg-jax embed`")
    p.add_argument("--method", default="pca", choices=choices.EMBED_METHODS)
    p.add_argument("--out", required=True, help=".png")
    p.add_argument("--size", default="1000x800", help="WIDTHxHEIGHT pixels")
    p.add_argument("--seed", type=non_negative, default=0)
    p.set_defaults(run="vgg_jax.plots:main_plot_embeddings")


def _activations(sub):
    p = sub.add_parser("activations", help="grid of a layer's feature maps beside the image")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("image")
    p.add_argument("--layer", default="conv3_1")
    p.add_argument("--max-maps", type=positive, default=64, help="show the N strongest channels")
    p.add_argument("--out", required=True, help=".png")
    p.add_argument("--size", default="1400x700", help="WIDTHxHEIGHT pixels")
    p.set_defaults(run="vgg_jax.plots:main_activations")


def _saliency(sub):
    p = sub.add_parser("saliency", help="class saliency map (Simonyan et al. 2013) overlaid")
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("image")
    p.add_argument("--class-name", default=None, help="default: the top class")
    p.add_argument("--out", required=True, help=".png")
    p.add_argument("--size", default="1200x450", help="WIDTHxHEIGHT pixels")
    p.set_defaults(run="vgg_jax.plots:main_saliency")


def _stylize(sub):
    p = sub.add_parser("stylize", help="neural style transfer (Gatys et al. 2016): CONTENT in "
                       "the style of STYLE")
    p.add_argument("content", help="content image")
    p.add_argument("style", help="style image (resized to the content's size)")
    p.add_argument("--out", required=True, help=".png (and OUT_side_by_side.png beside it)")
    p.add_argument("--weights", default="torchvision:vgg19", help=WEIGHTS_HELP)
    p.add_argument("--size", type=positive, default=256, help="the content's longer side")
    p.add_argument("--steps", type=positive, default=300, help="Adam steps on the pixels")
    p.add_argument("--learning-rate", type=positive_float, default=0.02)
    p.add_argument("--content-weight", type=float, default=1.0)
    p.add_argument("--style-weight", type=float, default=1e6)
    p.add_argument("--tv-weight", type=float, default=0.0, help="total variation")
    p.add_argument("--content-tap", default="relu4_2")
    p.add_argument("--style-taps", type=comma_list,
                   default=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"))
    p.add_argument("--max-pool", action="store_true",
                   help="keep VGG's max-pools (Gatys et al. use average pools)")
    p.set_defaults(run="vgg_jax.stylize:main")


def _published(sub):
    p = sub.add_parser("published", help="published weights by name: list them, or fetch "
                       "(download, verify, convert) into the cache")
    p.add_argument("names", nargs="*", help="e.g. vgg16 keras:vgg19 (none: list them all)")
    p.set_defaults(run="vgg_jax.published:main")


def _plot_metrics(sub):
    p = sub.add_parser("plot-metrics", help="loss, top-1/top-5 error and lr against step")
    p.add_argument("workdir", help="training workdir (has metrics.jsonl)")
    p.add_argument("--out", required=True, help=".png")
    p.add_argument("--size", default="1200x900", help="WIDTHxHEIGHT pixels")
    p.set_defaults(run="vgg_jax.plots:main_plot_metrics")


def _train(sub):
    # listed for --help; its own flags (absl's, --config.KEY=VALUE) are parsed by train_cmd
    sub.add_parser("train", add_help=False,
                   help="train a net: --config NAME[:ARG] --workdir DIR [--config.KEY=VALUE ...]"
                        " (`vgg-jax train --help` lists the flags)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # absl parses training's flags: the config and its overrides
        from vgg_jax import train_cmd
        train_cmd.main(argv[1:], prog="vgg-jax train")
        return 0
    parser = argparse.ArgumentParser(prog="vgg-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train(sub)
    for add in (_summary, _convert, _predict, _localize, _features, _prepare, _stats, _evaluate, _embed,
                _transfer, _plot_embeddings, _activations, _saliency, _plot_metrics,
                _stylize, _published):
        add(sub)
    args = vars(parser.parse_args(argv))
    command, target = args.pop("command"), args.pop("run")
    module, function = target.split(":")
    # the command owns its process: its process-wide settings are made here, not on import
    runtime.quiet_tensorflow()
    runtime.configure_cpu()
    try:
        runtime.enable_compile_cache()
        with runtime.tensorflow_import():  # quiet, and without Keras (runtime's doc)
            run = getattr(importlib.import_module(module), function)
        run(**args)
    except UserError as e:
        print(f"vgg-jax {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be made or read (a dangling link, no rights)
        if e.filename is None:
            raise
        print(f"vgg-jax {command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    return 0


def entry() -> int:
    """The `vgg-jax` console script: main(), ended without the interpreter's last garbage
    collection (runtime.skip_exit_collection) once it has returned."""
    code = main()
    runtime.skip_exit_collection()
    return code


if __name__ == "__main__":
    sys.exit(entry())
