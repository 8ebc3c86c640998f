"""vgg_jax: the VGG ConvNets (Simonyan & Zisserman, 2014) in JAX/Flax.

Importing vgg_jax (or any of its modules) changes nothing in the process: no environment
variables, import hooks, exception hooks, file descriptors or JAX listeners. The
process-wide XLA:CPU choices the commands run with are one explicit call,
`vgg_jax.configure_cpu()` (see vgg_jax.runtime), which `vgg-jax` and `train.py` make.
"""
from vgg_jax.models import (VGG, abstract_variables, all_arch_names, count_params,
                            create_model, extract, init_variables, layer_names, resolve_arch)
from vgg_jax.runtime import configure_cpu

__version__ = "0.1.0"
__all__ = ["VGG", "abstract_variables", "all_arch_names", "configure_cpu", "count_params",
           "create_model", "extract", "init_variables", "layer_names", "pretrained",
           "resolve_arch"]


def __getattr__(name):
    """`vgg_jax.pretrained` is imported on first use (PEP 562): its module loads weights
    with TensorFlow's image ops beside them, and importing TensorFlow takes ~4 s that
    building, initialising and running a model does not need."""
    if name == "pretrained":
        from vgg_jax.weights import pretrained
        return pretrained
    raise AttributeError(f"module 'vgg_jax' has no attribute {name!r}")
