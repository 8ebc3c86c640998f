"""One run per workdir: `hold(workdir)` before a run touches it, `.release()` at its end.

Local folder: an exclusive fcntl.flock on WORKDIR/.lock for the run's lifetime; the kernel
drops it when the process dies, even by SIGKILL, so nothing ever waits for it.

Cloud Storage (gs://): no locks there, so a lease object, WORKDIR/.lease, written through
tensorstore's kvstore with a generation precondition (GCS's compare-and-swap) and renewed
by its holder every third of its term. A run finds an unexpired lease of another holder
and refuses in one line; a lease whose holder stopped renewing (a killed run) expires
after `seconds` and is then taken over, by the same command resuming or another run. After
writing, the taker waits SETTLE_S and reads the lease back: of two runs that raced, only
the one whose write stands goes on (this also holds on stores that do not check
preconditions, such as GCS emulators)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from vgg_jax import storage
from vgg_jax.errors import UserError

log = logging.getLogger(__name__)
SETTLE_S = 1.0


def hold(workdir: str, seconds: float = 60.0):
    """The workdir's lock (local) or lease (gs://), held until `.release()`."""
    return Lease(workdir, seconds) if storage.is_remote(workdir) else WorkdirLock(workdir)


def _holder() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}"


class WorkdirLock:
    """An exclusive fcntl.flock on WORKDIR/.lock: a second run on the same workdir refuses
    at once, naming the holder."""

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
        self._file.write(_holder() + "\n")
        self._file.flush()

    def release(self):
        if not self._file.closed:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


class Lease:
    """WORKDIR/.lease on object storage (see the module doc)."""

    KEY = ".lease"

    def __init__(self, workdir: str, seconds: float = 60.0):
        import tensorstore as ts
        self.workdir, self.seconds = storage.absolute(workdir), float(seconds)
        prefix = self.workdir.split("://", 1)[1].split("/", 1)[1:]
        spec = {"driver": "gcs", "bucket": storage.bucket(self.workdir)}
        if prefix and prefix[0]:
            spec["path"] = prefix[0].rstrip("/") + "/"
        self._kv = ts.KvStore.open(spec).result()
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._generation = self._take()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="vgg_jax lease")
        self._thread.start()

    def _record(self) -> bytes:
        return json.dumps(dict(holder=_holder(), token=self.token,
                               expires=time.time() + self.seconds)).encode()

    def _refuse(self, held: dict):
        left = max(0.0, held["expires"] - time.time())
        raise UserError(
            f"workdir {self.workdir} is in use by {held['holder']} (its lease expires in "
            f"{left:.0f} s unless renewed; a killed run's lease expires {self.seconds:.0f} s "
            f"after its last renewal, then the same command resumes): wait, or give another "
            f"--workdir")

    def _take(self):
        found = self._kv.read(self.KEY).result()
        if found.state == "value":
            held = json.loads(found.value)
            if held["expires"] > time.time():
                self._refuse(held)
            log.warning("workdir %s: the lease of %s expired; taking it over", self.workdir,
                        held["holder"])
        try:
            self._kv.write(self.KEY, self._record(), if_equal=found.stamp.generation).result()
        except ValueError:  # the generation moved: another run wrote first
            self._refuse(json.loads(self._kv.read(self.KEY).result().value))
        time.sleep(SETTLE_S)
        now = self._kv.read(self.KEY).result()
        held = json.loads(now.value)
        if held["token"] != self.token:
            self._refuse(held)
        return now.stamp.generation

    def _renew(self):
        while not self._stop.wait(self.seconds / 3):
            try:
                stamp = self._kv.write(self.KEY, self._record(),
                                       if_equal=self._generation).result()
                self._generation = stamp.generation
            except Exception as e:  # noqa: BLE001 (a transport error or a lost lease: said)
                log.error("workdir %s: could not renew the run's lease (%s)", self.workdir, e)

    def release(self):
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        found = self._kv.read(self.KEY).result()
        if found.state == "value" and json.loads(found.value).get("token") == self.token:
            self._kv.write(self.KEY, None, if_equal=found.stamp.generation).result()
