"""vgg_jax: the VGG ConvNets (Simonyan & Zisserman, 2014) in JAX/Flax."""
from vgg_jax import runtime as _runtime

_runtime.quiet_tensorflow()  # before anything loads TensorFlow
from vgg_jax import conv as _conv  # noqa: E402

_conv.set_default_xla_flags()  # CPU: YNNPACK eval convs, classic fusion emitters
from vgg_jax.models import (VGG, abstract_variables, all_arch_names, count_params,
                            create_model, extract, init_variables, layer_names, resolve_arch)
from vgg_jax.published import pretrained  # noqa: E402

__version__ = "0.1.0"
__all__ = ["VGG", "abstract_variables", "all_arch_names", "count_params", "create_model",
           "extract", "init_variables", "layer_names", "pretrained", "resolve_arch"]
