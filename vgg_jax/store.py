"""A weights directory on disk: DIR/variables, an orbax PyTree of the Flax variables
({'params'[, 'batch_stats']}), and DIR/meta.json, which records the architecture, the model
options, the preprocessing the weights expect and the class names (weights.model_meta).
`vgg-jax convert`, published weights' conversion and training write them; `weights`
reads them (with training workdirs and names) into a net."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def save_weights(directory: str, variables, meta: dict) -> None:
    """variables ({'params'[, 'batch_stats']}) + meta.json into `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree.map(np.asarray, variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "variables"), variables, force=True)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def has_meta(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "meta.json"))


def is_weights_dir(directory: str) -> bool:
    return has_meta(directory) and os.path.isdir(os.path.join(directory, "variables"))


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def read_variables(directory: str):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(directory, "variables"))
