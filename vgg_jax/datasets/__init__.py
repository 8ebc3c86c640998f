"""TFDS builders shipped with vgg_jax (importing this registers them)."""
from vgg_jax.datasets.canvas import VggDigitsCanvas
from vgg_jax.datasets.digits import VggDigits
from vgg_jax.datasets.imagenet_localisation import Imagenet2012Localisation

__all__ = ["Imagenet2012Localisation", "VggDigits", "VggDigitsCanvas"]
