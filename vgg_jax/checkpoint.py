"""A training workdir's checkpoints and who may write them.

An orbax CheckpointManager in WORKDIR/checkpoints, each step holding the train state and
the input iterators' positions. Orbax writes a step into a temporary directory and renames
it when complete, so a crash mid-save never leaves a step that restore would pick up; a
step that cannot be read anyway (a full disk, broken storage) is moved aside to
STEP.corrupt and the run resumes from the newest readable one (`restore_latest`). The
workdir may be local or in Cloud Storage (vgg_jax.storage); one run at a time per workdir
is vgg_jax.lease's. (Weights directories, which everything that uses a trained net reads,
are `store`'s and `weights`'s.)"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vgg_jax import runtime, storage
from vgg_jax.errors import NotFound, UserError

log = logging.getLogger(__name__)
# orbax warns whenever a checkpoint directory is opened read-only, which is how a trained
# net is read from a workdir (weights.load_weights): nothing for the user to act on
logging.getLogger("absl").addFilter(lambda record: not record.getMessage().startswith(
    ("Given directory is read only", "CheckpointManagerOptions.read_only=True")))


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the last `keep` steps plus the best by validation top-1 accuracy. Saves are
    asynchronous: `save` returns once the arrays are copied off the devices and the files
    are written in the background (the next save, or `close`, waits for them); a step
    counts as saved only once orbax has finalised it, so a run killed mid-write resumes
    from the step before."""
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=lambda m: m["top1_acc"], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(storage.as_path(storage.join(workdir, "checkpoints")),
                                 options=options)


def save(mngr, step: int, state, data_state: dict, metrics: dict | None = None,
         wait: bool = False):
    """Start saving `step` (asynchronously unless `wait`): training may go on at once."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state)),
              metrics=metrics, force=True)
    if wait:
        mngr.wait_until_finished()


def restore(mngr, step: int, abstract_state):
    """(state, data_state) of `step`, laid out with abstract_state's shardings (the
    current mesh, not the one that saved it)."""
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def _reason(e: Exception) -> str:
    """The first sentence of an orbax / TensorStore error (they run to dozens of lines)."""
    text = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
    text = text.split(" See full TensorStore details")[0]
    return (text[:200] + "...") if len(text) > 200 else text


# what orbax's other reads of a bad step report (asyncio, then TensorStore's status texts)
_READ_NOISE = ("Event loop is closed", "Encountered error while reading array index",
               "OUT_OF_RANGE: ", "DATA_LOSS: ", "FAILED_PRECONDITION: ", 'Error opening "',
               'Error reading "')


@contextlib.contextmanager
def _failed_reads_reported_once():
    """While a restore runs, and until the reads it started have finished: a failed read
    of a bad step makes orbax's other pending reads fail later in background threads,
    each printing a traceback that says nothing new (the failure itself is reported in one
    line). Those, and only those, are dropped; the hooks are the caller's again on exit,
    so no later error of the run can be swallowed."""
    dropped = [0]

    def noise(e):
        if e is None or not any(n in str(e) for n in _READ_NOISE):
            return False
        dropped[0] += 1
        return True

    old = sys.unraisablehook, sys.excepthook, threading.excepthook
    sys.unraisablehook = lambda u: None if noise(u.exc_value) else old[0](u)
    sys.excepthook = lambda k, v, tb: None if noise(v) else old[1](k, v, tb)
    threading.excepthook = lambda a: None if noise(a.exc_value) else old[2](a)
    asyncio_filter = lambda record: not noise(record.getMessage())  # "never retrieved"
    logging.getLogger("asyncio").addFilter(asyncio_filter)
    failures = [0]
    try:
        yield failures
    finally:
        if failures[0]:  # let the failed reads finish now, while they are filtered
            _drain(dropped)
        sys.unraisablehook, sys.excepthook, threading.excepthook = old
        logging.getLogger("asyncio").removeFilter(asyncio_filter)


def _drain(dropped, quiet_for: float = 0.5, at_most: float = 5.0) -> None:
    """Wait until no new noise report has come for `quiet_for` seconds (collecting the
    failed reads' garbage, which is where several of them report)."""
    import gc
    import time
    gc.collect()
    start, last, seen = time.time(), time.time(), dropped[0]
    while time.time() - start < at_most and time.time() - last < quiet_for:
        time.sleep(0.05)
        gc.collect()
        if dropped[0] != seen:
            seen, last = dropped[0], time.time()


def _set_aside(path: str) -> str:
    aside, n = f"{path}.corrupt", 1
    while storage.exists(aside):
        aside, n = f"{path}.corrupt{n}", n + 1
    storage.rename(path, aside)
    return aside


def saved_tree(mngr, step: int):
    """The train state's tree of array metadata (shape, dtype) as saved at `step`, read
    from orbax's metadata without reading any array."""
    path = storage.join(str(mngr.directory), str(step), "state")
    # orbax warns about a missing metadata file, then returns none: reported below
    with runtime.absl_warnings_off(), ocp.StandardCheckpointer() as ckptr:
        md = ckptr.metadata(path)
    tree = getattr(md, "item_metadata", md)
    if not jax.tree.leaves(tree):
        raise ValueError(f"no array metadata in {path}")
    return tree


def tree_differences(saved, wanted, most: int = 3) -> list[str]:
    """'path: saved (16, 10) != now (16, 5)' lines where two trees of arrays (or array
    metadata) differ in structure or shape; at most `most`."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))

    def flat(tree):  # by names, whether the tree is a dataclass or the dicts orbax saved
        return {"/".join(map(name, path)): tuple(getattr(v, "shape", ()))
                for path, v in jax.tree_util.tree_leaves_with_path(tree)}
    a, b = flat(saved), flat(wanted)
    out = [f"{k}: saved {a[k]} != now {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    out += [f"{k}: saved, not in the train state now" for k in sorted(a.keys() - b.keys())]
    out += [f"{k}: in the train state now, not saved" for k in sorted(b.keys() - a.keys())]
    return out[:most]


def _agreed(flag: bool) -> list[bool]:
    """Every process's `flag`, in process order (one small collective)."""
    from vgg_jax import mesh
    return [bool(r[0]) for r in mesh.allgather_rows([int(flag)])]


def restore_latest(mngr, abstract_state, config_changes: str = ""):
    """(step, state, data_state) of the newest checkpoint that every process can read, or
    (None, None, None) when there is none.

    A checkpoint whose arrays do not fit `abstract_state` (the current config's model and
    optimiser) is refused in one UserError naming the first differing arrays and
    `config_changes` (the keys changed since the run that saved it); nothing is moved. A
    step that cannot be read (tried twice: a transient error is not corruption) is named
    in one line, moved aside to STEP.corrupt by process 0 and never deleted, and the next
    older step is tried; every process restores the same step. When no step can be read,
    nothing is moved and the error names every step tried and why."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None, None, None
    with _failed_reads_reported_once() as failures:
        differ = []
        for step in steps:  # the newest step whose metadata reads (its data is judged below)
            try:
                differ = tree_differences(saved_tree(mngr, step), abstract_state)
                break
            except MemoryError:
                raise  # this process's trouble, not the checkpoint's
            except Exception:  # tensorstore / orbax errors share no type
                failures[0] += 1
        if differ:
            mngr.close()
            because = f" (config changes: {config_changes})" if config_changes else ""
            raise UserError(
                f"the checkpoints in {mngr.directory} do not fit this config{because}: "
                f"{'; '.join(differ)}. Resume with the config that saved them, or train in "
                f"another --workdir; nothing was moved")
        failed = []
        for step in steps:
            result, reason = None, None
            for _ in range(2):
                try:
                    result = restore(mngr, step, abstract_state)
                    break
                except MemoryError:
                    raise  # this process's trouble, not the checkpoint's: nothing moved
                except Exception as e:  # tensorstore / orbax errors share no type
                    reason = _reason(e)
                    failures[0] += 1
            readable = _agreed(result is not None)
            if all(readable):
                break
            failed.append((step, reason or "unreadable on process "
                           + ", ".join(str(i) for i, ok in enumerate(readable) if not ok),
                           readable[0]))
        else:
            mngr.close()
            tried = "; ".join(f"step {s}: {r}" for s, r, _ in failed)
            raise UserError(f"no checkpoint in {mngr.directory} can be read ({tried}); move "
                            f"them out of the way to start again, or train in another --workdir")
    for bad, reason, readable_on_0 in failed if jax.process_index() == 0 else ():
        path = storage.join(str(mngr.directory), str(bad))
        if readable_on_0:  # another host's trouble (its storage, its network): keep it
            log.warning("checkpoint step %d (%s) cannot be read (%s): kept; resuming from "
                        "step %d", bad, path, reason, step)
        else:
            log.warning("checkpoint step %d (%s) cannot be read (%s): moved to %s; resuming "
                        "from step %d", bad, path, reason, _set_aside(path), step)
    if failed:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("vgg_jax checkpoints set aside")
        mngr.reload()
    return step, *result


def abstract(tree, shardings=None):
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore_params(workdir: str, which="latest"):
    """(step, state dict) of a training workdir's latest or best checkpoint (or the step
    `which` when it is a number), read without
    knowing the train state's structure (for `weights.load_weights`), onto this process's
    first device whatever topology saved it (8 devices, 2 processes x 4, ...): the target
    is built from the saved arrays' shapes and dtypes."""
    mngr = manager(workdir, read_only=True)
    step = {"best": mngr.best_step, "latest": mngr.latest_step}.get(which, lambda: which)()
    if step is None:
        raise NotFound(f"training workdir {workdir} has no finished checkpoint yet")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          saved_tree(mngr, step))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return step, restored["state"]


# ----------------------------------------------------------------------------- the config

# Keys that may change when a run resumes: how long it runs, how it reports and saves, where
# it finds its data and peers, and how it validates. Any other change (model, data recipe,
# optimiser, seed, dtype) makes a different run and needs train.allow_config_change=True.
RESUMABLE_CHANGES = frozenset({
    "train.num_epochs", "train.max_steps", "train.log_every_steps", "train.progress_bar",
    "train.eval_every_epochs", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.compile_cache", "train.distributed", "train.coordinator_address",
    "train.num_processes", "train.process_id", "train.allow_config_change",
    "train.init_from", "train.init_from_layers", "train.init_exclude",
    "train.init_from_required", "train.weights_cache", "train.workdir_lease_s", "data.data_dir",
    "eval.batch_size", "eval.protocol",
    "eval.scales"})
HISTORY = "config_history.jsonl"


def flat_config(config) -> dict:
    """{'optim.learning_rate': 0.02, ...}: a config as JSON values (tuples as lists)."""
    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    plain = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(dict(walk(plain)), default=str))


def last_config(workdir: str) -> dict | None:
    """The flat config the workdir's checkpoints were last trained with: the newest entry
    of config_history.jsonl (or config.json, for workdirs written before the history)."""
    history = storage.join(workdir, HISTORY)
    if storage.isfile(history):
        lines = [l for l in storage.read_text(history).splitlines() if l.strip()]
        if lines:
            return json.loads(lines[-1])["config"]
    first = storage.join(workdir, "config.json")
    if storage.isfile(first):
        return flat_config(json.loads(storage.read_text(first)))
    return None


def config_changes(old: dict, new: dict, resumable=RESUMABLE_CHANGES) -> dict:
    """{key: (old, new)} for keys that differ, leaving out the resumable ones."""
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if k not in resumable and old.get(k) != new.get(k)}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def record_config(workdir: str, config, step: int, changes: dict) -> None:
    """Keep the run's configs: config.json is the first run's and is never overwritten;
    config_history.jsonl gains one line per start (the step it started from, the time,
    the whole config and what changed)."""
    import time
    if not storage.isfile(storage.join(workdir, "config.json")):
        storage.write_text(storage.join(workdir, "config.json"),
                           config.to_json_best_effort(indent=2))
    entry = dict(step=step, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 changed={k: list(v) for k, v in changes.items()}, config=flat_config(config))
    storage.append_text(storage.join(workdir, HISTORY), json.dumps(entry) + "\n")


def check_config(config, workdir: str, mngr) -> dict:
    """The config keys that changed since the workdir's checkpoints were last trained
    ({key: (old, new)}, the resumable ones left out). A change refuses to resume, in one
    line naming each key, unless train.allow_config_change is set."""
    previous = last_config(workdir) if mngr.all_steps() else None
    changes = config_changes(previous, flat_config(config)) if previous else {}
    if changes and not config.train.allow_config_change:
        mngr.close()
        raise UserError(
            f"workdir {workdir} was trained with another config: {describe_changes(changes)}. "
            f"Resume with those values, train in another --workdir, or add "
            f"--config.train.allow_config_change=True to go on with the new ones (recorded "
            f"in {HISTORY})")
    return changes
