"""TFDS datasets on this machine: finding a dataset's builder, preparing one offline (the
bundled digits on first use, manual-download archives such as imagenet2012, MNIST-style
IDX files), and saying in one line how to prepare one that is missing. Nothing here
downloads: the machines this runs on often cannot."""
from __future__ import annotations

import logging
import os

import tensorflow_datasets as tfds

from vgg_jax import runtime
from vgg_jax.errors import NotFound, UserError


log = logging.getLogger(__name__)
BUNDLED = ("vgg_digits", "vgg_digits_canvas")  # prepared on first use: they need no download


def default_data_dir(data_dir: str | None = None) -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


# Manual-download datasets whose archives we know by name (others: TFDS's instructions).
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
                "imagenet2012_localisation": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                                              "ILSVRC2012_bbox_train_v2.tar.gz",
                                              "ILSVRC2012_bbox_val_v3.tgz")}
# TFDS datasets that download at prepare time, prepared here from their IDX files instead
OFFLINE_IDX = ("mnist", "fashion_mnist")


def _prepared(builder) -> bool:
    # TFDS warns "Variant folder ... has no dataset_info.json" about a dataset that is not
    # prepared yet, which is what this finds out
    with runtime.absl_warnings_off():
        return builder.is_prepared()


def _builder(name: str, data_dir: str):
    import vgg_jax.datasets  # noqa: F401  (registers the bundled builders)
    try:
        with runtime.absl_warnings_off():
            return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        what = f"unknown TFDS dataset {name!r}"
    except ValueError as e:  # TFDS wraps an unknown config of a known dataset this way
        if "BuilderConfig" not in str(e) or "not found" not in str(e):
            raise  # a builder that failed for another reason says so itself
        what = f"unknown config in TFDS dataset {name!r}"
    nor_folder = f" and no folder {name} exists" if "/" in name else ""
    raise UserError(f"{what}{nor_folder}; give a TFDS name such as vgg_digits, cifar10, "
                    f"voc/2007, imagenet2012, or an image folder root/class_name/*.jpg")


def manual_dir_for(data_dir: str | None = None) -> str:
    """TFDS's own place for manually downloaded archives: DATA_DIR/downloads/manual."""
    return os.path.join(default_data_dir(data_dir), "downloads", "manual")


def prepare_command(name: str, data_dir: str | None = None) -> str:
    return f"vgg-jax prepare {name} --data-dir {default_data_dir(data_dir)}"


def tfds_builder(name: str, data_dir: str | None = None):
    """A prepared TFDS builder (the bundled ones prepare themselves), or a clear error
    saying how to prepare it."""
    data_dir = default_data_dir(data_dir)
    builder = _builder(name, data_dir)
    if _prepared(builder):
        return builder
    if name in BUNDLED:
        return _prepare_once(builder, name, data_dir)
    if name in OFFLINE_IDX:
        raise NotFound(
            f"TFDS dataset {name!r} is not prepared in {data_dir}: prepare it offline from its "
            f"four IDX files (train-images-idx3-ubyte.gz ... t10k-labels-idx1-ubyte.gz) with "
            f"`vgg-jax prepare {name} --manual-dir DIR --data-dir {data_dir}`"
            + (" (Debian: apt-get install dataset-fashion-mnist puts them in "
               "/usr/share/datasets/fashion-mnist)" if name == "fashion_mnist" else ""))
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        files = " and ".join(MANUAL_FILES.get(builder.name, ("the archives TFDS describes",)))
        raise NotFound(
            f"TFDS dataset {name!r} is not prepared in {data_dir}: put {files} in "
            f"{manual_dir_for(data_dir)}, then run `{prepare_command(name, data_dir)}`")
    raise NotFound(
        f"TFDS dataset {name!r} is not prepared in {data_dir}. This machine cannot download it: "
        f"prepare it where the network is available (`{prepare_command(name, 'DIR')}`) and "
        f"copy DIR here (set data.data_dir or TFDS_DATA_DIR), or use an image folder instead.")


def _prepare_once(builder, name: str, data_dir: str, **kwargs):
    """Prepare `builder` unless another process on this machine is doing it or did it:
    several processes of one run start together, and two preparations of one dataset
    race on TFDS's final rename. An flock on DATA_DIR/NAME.prepare.lock serialises them;
    whoever comes second finds the dataset prepared."""
    import fcntl
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f"{name.replace('/', '_')}.prepare.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = _builder(name, data_dir)  # a fresh look: the holder may have prepared it
        if not _prepared(builder):
            log.info("preparing %s in %s (offline, once)", name, data_dir)
            builder.download_and_prepare(**kwargs)
    return builder


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None):
    """Prepare a TFDS dataset through the builder API (no Beam, no network for
    manual-download datasets): from the archives in `manual_dir` (default
    DATA_DIR/downloads/manual) for datasets such as imagenet2012. TFDS shows a progress
    bar per split. Returns the prepared builder."""
    data_dir = default_data_dir(data_dir)
    builder = _builder(name, data_dir)
    if name in OFFLINE_IDX and not _prepared(builder):
        from vgg_jax.datasets import idx
        manual = os.path.abspath(manual_dir or manual_dir_for(data_dir))
        log.info("preparing %s in %s from the IDX files in %s", name, data_dir, manual)
        return idx.prepare_idx(name, manual, data_dir)
    if _prepared(builder) or name in BUNDLED or not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return tfds_builder(name, data_dir)
    manual = os.path.abspath(manual_dir or manual_dir_for(data_dir))
    expected = MANUAL_FILES.get(builder.name)
    if expected:
        missing = [f for f in expected if not os.path.isfile(os.path.join(manual, f))]
        if missing:
            raise NotFound(
                f"{name}: {', '.join(missing)} not found in {manual} (expected "
                f"{' and '.join(expected)} there, as downloaded; or give --manual-dir DIR)")
    elif not os.path.isdir(manual) or not os.listdir(manual):
        first = builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip().splitlines()[0]
        raise NotFound(f"{name}: no downloaded files in {manual} ({first})")
    log.info("preparing %s in %s from %s", name, data_dir, manual)
    return _prepare_once(builder, name, data_dir,
                         download_config=tfds.download.DownloadConfig(manual_dir=manual))


def main_prepare(*, dataset: str = "vgg_digits", data_dir: str | None = None,
                 manual_dir: str | None = None):
    builder = prepare(dataset, data_dir, manual_dir)
    print(f"{dataset}: prepared in {builder.data_dir}")
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples")
