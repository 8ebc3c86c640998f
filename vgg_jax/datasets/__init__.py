"""TFDS builders shipped with vgg_jax (importing this registers them)."""
from vgg_jax.datasets.canvas import VggDigitsCanvas
from vgg_jax.datasets.digits import VggDigits

__all__ = ["VggDigits", "VggDigitsCanvas"]
