"""A training workdir's checkpoints and who may write them.

An orbax CheckpointManager in WORKDIR/checkpoints, each step holding the train state and
the input iterators' positions. Orbax writes a step into a temporary directory and renames
it when complete, so a crash mid-save never leaves a step that restore would pick up; a
step that cannot be read anyway (a full disk, broken storage) is moved aside to
STEP.corrupt and the run resumes from the newest readable one (`restore_latest`). One run
at a time per workdir (`lock_workdir`). (Weights directories, which everything that uses a
trained net reads, are `weights`'s.)"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import threading

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from vgg_jax.errors import NotFound, UserError

log = logging.getLogger(__name__)
# orbax warns whenever a checkpoint directory is opened read-only, which is how a trained
# net is read from a workdir (weights.load_weights): nothing for the user to act on
logging.getLogger("absl").addFilter(lambda record: not record.getMessage().startswith(
    ("Given directory is read only", "CheckpointManagerOptions.read_only=True")))


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


def _reason(e: Exception) -> str:
    """The first sentence of an orbax / TensorStore error (they run to dozens of lines)."""
    text = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
    text = text.split(" See full TensorStore details")[0]
    return (text[:200] + "...") if len(text) > 200 else text


# what orbax's other reads of a bad step report (asyncio, then TensorStore's status texts)
_READ_NOISE = ("Event loop is closed", "Encountered error while reading array index",
               "OUT_OF_RANGE: ", "DATA_LOSS: ", "FAILED_PRECONDITION: ", 'Error opening "',
               'Error reading "')
_dropped = [0]  # how many noise reports were dropped so far


def _drain_failed_reads(quiet_for: float = 0.5, at_most: float = 5.0) -> None:
    """Let the failed restore's other reads finish now, while the filters are installed,
    rather than at interpreter exit (where nothing can filter them): wait until no new
    report has come for `quiet_for` seconds."""
    import gc
    import time
    gc.collect()
    start, last, seen = time.time(), time.time(), _dropped[0]
    while time.time() - start < at_most and time.time() - last < quiet_for:
        time.sleep(0.05)
        gc.collect()
        if _dropped[0] != seen:
            seen, last = _dropped[0], time.time()


def _drop_read_noise() -> None:
    """After a failed restore, orbax's other pending reads fail later in background
    threads and at exit, each printing a traceback that says nothing new. Drop exactly
    those (the failure itself was reported in one line); every other error still shows."""
    if getattr(sys.unraisablehook, "vgg_jax", False):
        return
    def noise(e):
        if e is None or not any(n in str(e) for n in _READ_NOISE):
            return False
        _dropped[0] += 1
        return True

    old_unraisable, old_except, old_thread = (sys.unraisablehook, sys.excepthook,
                                              threading.excepthook)

    def unraisable(u):
        if not noise(u.exc_value):
            old_unraisable(u)

    def excepthook(kind, value, tb):
        if not noise(value):
            old_except(kind, value, tb)

    def thread_hook(args):
        if not noise(args.exc_value):
            old_thread(args)

    logging.getLogger("asyncio").addFilter(  # "exception was never retrieved"
        lambda record: not noise(record.getMessage()))
    unraisable.vgg_jax = True
    sys.unraisablehook, sys.excepthook, threading.excepthook = (unraisable, excepthook,
                                                                thread_hook)


def _set_aside(path: str) -> str:
    aside, n = f"{path}.corrupt", 1
    while os.path.exists(aside):
        aside, n = f"{path}.corrupt{n}", n + 1
    os.rename(path, aside)
    return aside


def restore_latest(mngr, abstract_state):
    """(step, state, data_state) of the newest checkpoint that can be read, or (None, None,
    None) when there is none. Newer steps that fail to restore are named in one line each
    and moved aside to STEP.corrupt (never deleted); when no step can be read, nothing is
    moved and the error names every step tried and why."""
    failed = []
    steps = sorted(mngr.all_steps(), reverse=True)
    if steps:  # before the first read: a failing one reports from other threads at once
        _drop_read_noise()
    for step in steps:
        try:
            state, data = restore(mngr, step, abstract_state)
        except Exception as e:  # tensorstore / orbax errors share no type: any is a bad step
            failed.append((step, _reason(e)))
            _drain_failed_reads()
            continue
        for bad, reason in failed:
            path = os.path.join(str(mngr.directory), str(bad))
            aside = _set_aside(path) if jax.process_index() == 0 else f"{path}.corrupt"
            log.warning("checkpoint step %d (%s) cannot be read (%s): moved to %s; resuming "
                        "from step %d", bad, path, reason, aside, step)
        if failed:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("vgg_jax checkpoints set aside")
            mngr.reload()
        return step, state, data
    if failed:
        mngr.close()
        tried = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise UserError(f"no checkpoint in {mngr.directory} can be read ({tried}); move them "
                        f"out of the way to start again, or train in another --workdir")
    return None, None, None


class WorkdirLock:
    """An exclusive fcntl.flock on WORKDIR/.lock for the run's lifetime: a second run on the
    same workdir refuses at once, naming the holder. The kernel drops the lock when the
    holding process dies, so a SIGKILLed run never blocks the next one."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise UserError(f"workdir {workdir} is in use by {holder}: wait for that run to "
                            f"end, or give another --workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self):
        if not self._file.closed:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


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
