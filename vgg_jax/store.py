"""A weights directory on disk: DIR/variables, an orbax PyTree of the Flax variables
({'params'[, 'batch_stats']}), and DIR/meta.json, which records the architecture, the model
options, the preprocessing the weights expect and the class names (weights.model_meta).
`vgg-jax convert`, published weights' conversion and training write them; `weights`
reads them (with training workdirs and names) into a net."""
from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp

from vgg_jax import storage


def save_weights(directory: str, variables, meta: dict) -> None:
    """variables ({'params'[, 'batch_stats']}) + meta.json into `directory` (local or
    gs://)."""
    directory = storage.absolute(directory)
    storage.makedirs(directory)
    variables = jax.tree.map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(storage.as_path(storage.join(directory, "variables")), variables, force=True)
    storage.write_text(storage.join(directory, "meta.json"), json.dumps(meta, indent=2))


def has_meta(directory: str) -> bool:
    return storage.isfile(storage.join(directory, "meta.json"))


def is_weights_dir(directory: str) -> bool:
    return has_meta(directory) and storage.isdir(storage.join(directory, "variables"))


def read_meta(directory: str) -> dict:
    return json.loads(storage.read_text(storage.join(directory, "meta.json")))


def read_variables(directory: str):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(storage.as_path(storage.join(directory, "variables")))
