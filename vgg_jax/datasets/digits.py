"""`vgg_digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset.

It ships inside scikit-learn, so it prepares with no network: the bundled default dataset
that the README's training command and the test suite use. Images are upsampled to 32x32
RGB (the smallest input five 2x2 pools allow) and split once, stratified, with a fixed seed.
"""
import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_SIZE = 360  # 1,437 train / 360 test, stratified by class
SPLIT_SEED = 0


def digits_arrays():
    """(train_images, train_labels, test_images, test_labels) as uint8 32x32x3 / int."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # 0..16 ink levels -> 0..255, bilinear upsampling to 32x32, grey replicated to RGB.
    small = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                           Image.BILINEAR)) for im in small])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    idx = np.arange(len(rgb))
    tr, te = train_test_split(idx, test_size=TEST_SIZE, stratify=d.target,
                              random_state=SPLIT_SEED)
    return rgb[tr], d.target[tr], rgb[te], d.target[te]


class VggDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits, 32x32 RGB, fixed 1437/360 train/test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        xtr, ytr, xte, yte = digits_arrays()
        return {"train": self._generate_examples(xtr, ytr),
                "test": self._generate_examples(xte, yte)}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
