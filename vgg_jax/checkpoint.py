"""Training checkpoints: an orbax CheckpointManager in WORKDIR/checkpoints, each step
holding the train state and the input iterators' positions. Orbax writes a step into a
temporary directory and renames it when complete, so a crash mid-save never leaves a step
that restore would pick up. (Weights directories, which everything that uses a trained net
reads, are `weights`'s.)"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vgg_jax.errors import NotFound


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


def restore_params(workdir: str, which: str = "latest"):
    """(step, state dict) of a training workdir's latest or best checkpoint, read without
    knowing the train state's structure (for `weights.load_weights`)."""
    mngr = manager(workdir, read_only=True)
    step = mngr.best_step() if which == "best" else mngr.latest_step()
    if step is None:
        raise NotFound(f"training workdir {workdir} has no finished checkpoint yet")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]
