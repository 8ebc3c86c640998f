"""Where weights live on disk.

Training checkpoints: an orbax CheckpointManager in WORKDIR/checkpoints, each step holding
the train state and the input iterators' positions. Orbax writes a step into a temporary
directory and renames it when complete, so a crash mid-save never leaves a step that
restore would pick up.

Weights directories (what `convert`, `predict`, `evaluate` and fine-tuning read): an orbax
PyTree of the Flax variables in DIR/variables plus DIR/meta.json, which records the
architecture, model options and the preprocessing convention the weights expect.
A training workdir is accepted wherever a weights directory is.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the last `keep` steps plus the best by validation top-1 accuracy."""
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=lambda m: m["top1_acc"], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=options)


def save(mngr, step: int, state, data_state: dict, metrics: dict | None = None):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state)),
              metrics=metrics, force=True)
    mngr.wait_until_finished()


def restore(mngr, step: int, abstract_state):
    """(state, data_state) of `step`, laid out with abstract_state's shardings (the
    current mesh, not the one that saved it)."""
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def abstract(tree, shardings=None):
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


# ----------------------------------------------------------------------------- weights

def save_weights(directory: str, variables, meta: dict) -> None:
    """variables ({'params'[, 'batch_stats']}) + meta.json into `directory`."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    variables = jax.tree.map(np.asarray, variables)
    target = os.path.join(directory, "variables")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, variables, force=True)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(path: str) -> dict:
    """meta.json of a weights directory or training workdir, without loading weights."""
    f = os.path.join(os.path.abspath(path), "meta.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(
            f"{path} has no meta.json: expected a weights directory (written by `vgg-jax "
            f"convert` or training) or a training workdir")
    with open(f) as fh:
        return json.load(fh)


def load_weights(path: str, which: str = "latest"):
    """(variables, meta) from a weights directory or a training workdir (`which`:
    'latest' or 'best' checkpoint of a workdir)."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(
            os.path.join(path, "variables")):
        meta = read_meta(path)
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(os.path.join(path, "variables"))
        return variables, meta
    if os.path.isdir(os.path.join(path, "checkpoints")):
        meta = read_meta(path)
        mngr = manager(path, read_only=True)
        step = mngr.best_step() if which == "best" else mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"training workdir {path} has no finished checkpoint yet")
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        state = restored["state"]
        variables = {"params": state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        return variables, dict(meta, step=int(step))
    raise FileNotFoundError(
        f"{path} is neither a weights directory (meta.json + variables/, written by "
        f"`vgg-jax convert` or training) nor a training workdir (checkpoints/)")


def model_from_meta(meta: dict, **overrides):
    """The VGG module described by a weights directory's meta.json."""
    from vgg_jax import models
    kwargs = dict(meta["model"])
    kwargs.update(overrides)
    return models.create_model(**kwargs)
