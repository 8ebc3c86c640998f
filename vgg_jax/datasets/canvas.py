"""`vgg_digits_canvas`: the bundled digits placed on a larger canvas, with their boxes.

A small offline localisation dataset (the paper's task, Appendix A, at the size of the
test suite): each of scikit-learn's 1,797 digits is resized to a random side in
[MIN_SIDE, MAX_SIDE] and pasted at a random place of a CANVAS x CANVAS black canvas; its
box is the tight box around the ink (pixels above INK), as TFDS's BBoxFeature stores
boxes (ymin, xmin, ymax, xmax, fractions of the canvas). The split is `vgg_digits`' own
(1,437 train / 360 test), and every draw comes from a fixed seed, so the dataset is the
same on every machine. Objects vary in place and size, so no constant box finds them:
`constant_box_accuracy` measures what the mean training box scores on the test split.
"""
import numpy as np
import tensorflow_datasets as tfds

from vgg_jax.datasets.digits import digits_arrays

CANVAS = 64
MIN_SIDE, MAX_SIDE = 20, 40
INK = 64  # a pixel above this (of 255) is ink
SEEDS = {"train": 1, "test": 2}


def place(image: np.ndarray, rng: np.random.Generator):
    """(canvas uint8 (CANVAS, CANVAS, 3), box (ymin, xmin, ymax, xmax) fractions) of one
    digit image (32x32x3): resized to a random side and pasted at a random place."""
    from PIL import Image
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    small = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
    y, x = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
    canvas = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    canvas[y:y + side, x:x + side] = small
    rows, cols = np.nonzero(canvas[..., 0] > INK)
    box = np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32) / CANVAS
    return canvas, box


def canvas_arrays(split: str):
    """(images (N, CANVAS, CANVAS, 3) uint8, labels (N,), boxes (N, 4)) of a split."""
    xtr, ytr, xte, yte = digits_arrays()
    images, labels = (xtr, ytr) if split == "train" else (xte, yte)
    rng = np.random.default_rng(SEEDS[split])
    placed = [place(im, rng) for im in images]
    return (np.stack([c for c, _ in placed]), np.asarray(labels),
            np.stack([b for _, b in placed]))


class VggDigitsCanvas(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits at random places and sizes on a 64x64 canvas, with boxes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(CANVAS, CANVAS, 3)),
                "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                # ImageNet's localisation data has several boxes of the image's class
                "bboxes": tfds.features.Sequence(tfds.features.BBoxFeature()),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: made from scikit-learn's digits
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        images, labels, boxes = canvas_arrays(split)
        for i, (image, label, box) in enumerate(zip(images, labels, boxes)):
            yield i, {"image": image, "label": int(label),
                      "bboxes": [tfds.features.BBox(*(float(v) for v in box))]}
