"""When to stop for a preemption: one question the training loop asks at every training
step and every validation batch, `Preemption.reached()`.

Under `jax.distributed` it is JAX's own protocol, through orbax's CheckpointManager
(`reached_preemption`, i.e. `multihost_utils.reached_preemption_sync_point`): JAX's
preemption notifier catches the SIGTERM on whichever host gets it, the coordination
service tells every host, and all of them answer True at the same tick, so they save the
same step. In a single process (where that service does not run) a SIGTERM handler sets
the flag and `reached()` answers it at the next tick: the same call, the same loop.

A tick is a training step or a validation batch; every process makes the same sequence of
calls (the training-time validation's batches are global), which is what JAX's protocol
needs. Standalone evaluation has its own handler (`stop_on_sigterm`).
"""
from __future__ import annotations

import contextlib
import logging
import signal

import jax

log = logging.getLogger(__name__)


def _jax_service_running() -> bool:
    from jax._src import distributed  # where jax.distributed keeps its state
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class Preemption:
    """`reached()` once per tick, on every process; `close()` at the end."""

    def __init__(self, mngr):
        self._mngr, self.tick, self.requested = mngr, 0, False
        self.jax_service = jax.process_count() > 1 and _jax_service_running()
        self._old = None
        if not self.jax_service:  # JAX's notifier holds SIGTERM where the service runs
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the current step, then stopping")
        self.requested = True

    def reached(self) -> bool:
        """Whether to stop now (the same answer on every process at the same tick)."""
        self.tick += 1
        if self.jax_service:
            return self._mngr.reached_preemption(self.tick)
        return self.requested

    def close(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


class Stopped(BaseException):
    """Raised in the main thread by `stop_on_sigterm`'s handler; a BaseException, as
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def stop_on_sigterm():
    """A SIGTERM inside the block raises `Stopped` (standalone evaluation: nothing to save,
    so the command ends at once with one line)."""
    def handle(signum, frame):
        raise Stopped("stopped by SIGTERM")
    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
