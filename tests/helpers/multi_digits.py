"""A multi-label TFDS dataset built offline (VOC's layout: a 'labels' sequence of
ClassLabel) for tests/test_research.py and bench/seed_spread.py."""
import numpy as np
import tensorflow_datasets as tfds

from vgg_jax.datasets import digits


class VggMultiDigitsTest(tfds.core.GeneratorBasedBuilder):
    """A multi-label TFDS dataset the test builds (VOC's layout: a 'labels' sequence of
    ClassLabel): 64x64 images of four 32x32 quadrants, each a real digit 0, 1 or 2 from
    the test split, or black; an image's labels are the digits it shows."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="quadrants")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(64, 64, 3)),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=["0", "1", "2"]))}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 48), "test": self._generate_examples(1, 32)}

    def _generate_examples(self, seed, n):
        _, _, images, labels = digits.digits_arrays()
        rng = np.random.default_rng(seed)
        pool = {c: images[labels == c] for c in (0, 1, 2)}
        for i in range(n):
            image, present = np.zeros((64, 64, 3), np.uint8), set()
            for q in range(4):
                c = int(rng.integers(-1, 3))  # -1: a black quadrant
                if c >= 0:
                    y, x = divmod(q, 2)
                    image[32 * y:32 * y + 32, 32 * x:32 * x + 32] = pool[c][rng.integers(len(pool[c]))]
                    present.add(c)
            yield i, {"image": image, "labels": sorted(present)}
