"""MNIST and Fashion-MNIST prepared offline from the four official IDX files.

TFDS's `mnist` and `fashion_mnist` builders download their files at prepare time, which
this machine cannot. `prepare_idx(name, manual_dir, data_dir)` writes the same TFDS
datasets (same name, version, features and class names, so `data.dataset=fashion_mnist`
works unchanged) from the files a user already has, e.g. Debian's `dataset-fashion-mnist`
package (`/usr/share/datasets/fashion-mnist/`): `train-images-idx3-ubyte.gz`,
`train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`
(gzipped or not). Each file is checked (magic number, sizes, image and label counts
agree) before anything is written; a missing or wrong file is one error naming it.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from vgg_jax.errors import NotFound, UserError

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x00000803 (uint8, 3 dims), 0x00000801
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SIDE = 28


def find(manual_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(manual_dir, name)
        if os.path.isfile(path):
            return path
    raise NotFound(f"{stem}.gz not found in {manual_dir} (expected the four IDX files "
                   f"{', '.join(s + '.gz' for pair in FILES.values() for s in pair)})")


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file's array (gzipped or not), its header checked."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise UserError(f"{path} is not an IDX {'image' if ndim == 3 else 'label'} file "
                        f"(magic number {found}, expected {magic})")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data where its header "
                        f"announces {'x'.join(map(str, dims))}: the file is truncated or damaged")
    if ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise UserError(f"{path} holds {dims[1]}x{dims[2]} images; MNIST-style datasets are "
                        f"{SIDE}x{SIDE}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_split(manual_dir: str, split: str):
    images_file, labels_file = (find(manual_dir, s) for s in FILES[split])
    images, labels = read_idx(images_file, IMAGES_MAGIC), read_idx(labels_file, LABELS_MAGIC)
    if len(images) != len(labels):
        raise UserError(f"{images_file} has {len(images)} images but {labels_file} has "
                        f"{len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise UserError(f"{labels_file} has label {labels.max()}; expected 0..9")
    return images, labels


class _FromIdx:
    """The split generators of an MNIST-style TFDS builder, reading the IDX files in the
    download config's manual_dir instead of downloading them."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in the manual dir.")

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*read_split(str(dl_manager.manual_dir), split))
                for split in FILES}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


class MnistFromIdx(_FromIdx, tfds_mnist.MNIST, skip_registration=True):
    name = "mnist"


class FashionMnistFromIdx(_FromIdx, tfds_mnist.FashionMNIST, skip_registration=True):
    name = "fashion_mnist"


BUILDERS = {"mnist": MnistFromIdx, "fashion_mnist": FashionMnistFromIdx}


def prepare_idx(name: str, manual_dir: str, data_dir: str):
    """Write TFDS's `name` (mnist or fashion_mnist) in data_dir from manual_dir's IDX
    files; returns the prepared builder as TFDS itself loads it."""
    for split in FILES:  # every file checked before anything is written
        read_split(manual_dir, split)
    BUILDERS[name](data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return tfds.builder(name, data_dir=data_dir)
