"""Fashion-MNIST / MNIST prepared offline from their four IDX files, as the Debian package
`dataset-fashion-mnist` ships them. The files here are tiny ones the test writes in the
official format (big-endian header, magic numbers 2051 / 2049, gzipped)."""
import gzip
import os
import subprocess

import numpy as np
import pytest

from vgg_jax import input_pipeline, prepared


def write_idx(path, magic, array):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.asarray(array, np.uint8).tobytes())


def write_fashion(root, train=24, test=8, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for split, n in (("train", train), ("t10k", test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), 2051, images)
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), 2049, labels)
        arrays[split] = images, labels
    return arrays


def prepare(*args):
    return subprocess.run(["vgg-jax", "prepare", *args], capture_output=True, text=True,
                          timeout=300)


def test_fashion_mnist_prepares_offline_from_idx_files_and_reads_as_tfds(tmp_path):
    manual, data_dir = str(tmp_path / "idx"), str(tmp_path / "tfds")
    arrays = write_fashion(manual)
    # before: the dataset is missing, and the message says how to prepare it offline
    with pytest.raises(input_pipeline.NotFound, match=r"vgg-jax prepare fashion_mnist "
                                                      r"--manual-dir DIR"):
        input_pipeline.make_source("fashion_mnist", "train", data_dir)
    out = prepare("fashion_mnist", "--manual-dir", manual, "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train: 24 examples" in out.stdout and "test: 8 examples" in out.stdout
    # data.dataset=fashion_mnist reads it unchanged: TFDS's own builder, its class names
    source = input_pipeline.make_source("fashion_mnist", "test", data_dir)
    assert source.total_examples == 8 and source.class_names[:2] == ["T-shirt/top", "Trouser"]
    pixels = {}
    for image_bytes, label in source.epoch_dataset(0, False, 0).as_numpy_iterator():
        import tensorflow as tf
        pixels[int(label)] = tf.io.decode_png(image_bytes).numpy()[..., 0]
    images, labels = arrays["t10k"]
    for image, label in zip(images, labels):  # every example, byte for byte
        np.testing.assert_array_equal(pixels[int(label)], image)


@pytest.mark.parametrize("damage, message", [
    ("missing", "t10k-labels-idx1-ubyte.gz not found in"),
    ("magic", "t10k-labels-idx1-ubyte.gz is not an IDX label file (magic number 2051, expected 2049)"),
    ("truncated", "train-images-idx3-ubyte.gz holds 1000 bytes of data where its header "
                  "announces 24x28x28"),
    ("count", "t10k-images-idx3-ubyte.gz has 8 images but"),
])
def test_a_missing_or_wrong_idx_file_is_one_line_naming_it(tmp_path, damage, message):
    manual = str(tmp_path / "idx")
    write_fashion(manual)
    labels = os.path.join(manual, "t10k-labels-idx1-ubyte.gz")
    if damage == "missing":
        os.remove(labels)
    elif damage == "magic":
        write_idx(labels, 2051, np.zeros((8, 28, 28)))
    elif damage == "truncated":
        path = os.path.join(manual, "train-images-idx3-ubyte.gz")
        with gzip.open(path) as f:
            raw = f.read()
        with gzip.open(path, "wb") as f:
            f.write(raw[:16 + 1000])
    else:
        write_idx(labels, 2049, np.zeros(5))
    if damage == "missing":  # through the command line: one line, exit status 2
        out = prepare("fashion_mnist", "--manual-dir", manual, "--data-dir",
                      str(tmp_path / "tfds"))
        assert out.returncode == 2 and "Traceback" not in out.stderr
        [line] = [l for l in out.stderr.splitlines() if l.strip()]
        assert line.startswith("vgg-jax prepare: error: ") and message in line, line
    else:  # the same function, in process (the command line costs ~10 s a start)
        with pytest.raises(input_pipeline.UserError) as e:
            prepared.prepare("fashion_mnist", str(tmp_path / "tfds"), manual)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "tfds" / "fashion_mnist" / "3.0.1")  # nothing written


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    """A --data-dir that is a dangling link (its target gone): `vgg-jax prepare` names the
    path it could not make, on one line, exit 2 (it was a FileNotFoundError traceback)."""
    manual, dangling = str(tmp_path / "idx"), tmp_path / "tfds"
    write_fashion(manual)
    os.symlink(tmp_path / "gone", dangling)
    out = prepare("fashion_mnist", "--manual-dir", manual, "--data-dir", str(dangling))
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert err[-1].startswith(
        f"vgg-jax prepare: error: No such file or directory: {dangling}"), err
