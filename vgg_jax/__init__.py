"""vgg_jax: the VGG ConvNets (Simonyan & Zisserman, 2014) in JAX/Flax."""
from vgg_jax import runtime as _runtime

_runtime.quiet_tensorflow()  # before anything loads TensorFlow
from vgg_jax import conv as _conv  # noqa: E402

_conv.set_default_xla_flags()  # CPU: YNNPACK eval convs, classic fusion emitters
_runtime.trim_heap_after_compiles()  # the compiler's freed memory back to the system
from vgg_jax.models import (VGG, abstract_variables, all_arch_names, count_params,
                            create_model, extract, init_variables, layer_names, resolve_arch)

__version__ = "0.1.0"
__all__ = ["VGG", "abstract_variables", "all_arch_names", "count_params", "create_model",
           "extract", "init_variables", "layer_names", "pretrained", "resolve_arch"]


def __getattr__(name):
    """`vgg_jax.pretrained` is imported on first use (PEP 562): its module loads weights
    with TensorFlow's image ops beside them, and importing TensorFlow takes ~4 s that
    building, initialising and running a model does not need."""
    if name == "pretrained":
        from vgg_jax.published import pretrained
        return pretrained
    raise AttributeError(f"module 'vgg_jax' has no attribute {name!r}")
