"""Devices and hosts: the 'data' mesh that batches are sharded over, and joining a
multi-process (multi-host) run. Training, evaluation and embedding all use these."""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def data_mesh(devices=None):
    """(mesh, batch sharding, replicated sharding) over `devices` (default: all) with one
    'data' axis, with Auto axes (jax 0.10's make_mesh defaults to Explicit)."""
    devices = jax.devices() if devices is None else devices
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    return mesh, NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def per_process_batch(images: int) -> int:
    """`images` rounded up to a multiple of this process's devices (a batch each of them
    gets an equal share of)."""
    n = jax.local_device_count()
    return -(-images // n) * n


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize, once, before anything starts JAX's backends (which is
    why nothing here asks JAX about devices or platforms first). With an address all
    three values are given; without, JAX finds the cluster itself (Cloud TPU pods, SLURM,
    Open MPI, Kubernetes). CPU processes talk through gloo collectives: the option only
    concerns the CPU client, so it is set whatever the platform."""
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # no address and no cluster JAX recognises
        from vgg_jax.errors import UserError
        raise UserError(f"cannot join a multi-process run ({e}); give the coordinator "
                        f"address, the number of processes and this process's index") from None


def allgather_sum(values):
    """Element-wise sum of a flat list of numbers over every process (a no-op alone), as
    Python floats. The values travel as float32 (exact for counts below 2**24) and are
    summed in float64."""
    import numpy as np
    values = np.asarray(values, np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        every = multihost_utils.process_allgather(values.astype(np.float32))
        values = np.asarray(every, np.float64).reshape(jax.process_count(), -1).sum(0)
    return [float(v) for v in values]


class DataParallel:
    """Pure steps jitted over a 'data' mesh: the state replicated (and donated to the
    train step), batches sharded on their first axis. `train_step(state, batch) ->
    (state, metrics)` and `eval_step(state, batch) -> sums` are given, not built here."""

    def __init__(self, train_step=None, eval_step=None, devices=None):
        from vgg_jax import conv
        self.mesh, self.data, self.replicated = data_mesh(devices)
        if train_step is not None:
            platform = self.mesh.devices.flat[0].platform
            self.train_step = jax.jit(train_step, in_shardings=(self.replicated, self.data),
                                      out_shardings=(self.replicated, self.replicated),
                                      donate_argnums=(0,),
                                      compiler_options=conv.train_compiler_options(platform))
        if eval_step is not None:
            self.eval_step = conv.jit_eval(eval_step, in_shardings=(self.replicated, self.data),
                                           out_shardings=self.replicated)

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def global_batch(self, local_batch: dict):
        """This process's slice -> global arrays sharded over 'data'."""
        return {k: jax.make_array_from_process_local_data(self.data, v)
                for k, v in local_batch.items()}


def allgather_rows(row):
    """One small integer row per process -> a list of every process's row, in order."""
    import numpy as np
    mine = np.asarray(row, np.int64)
    if jax.process_count() == 1:
        return [mine.tolist()]
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine))
    return [r.tolist() for r in every]


def allgather_strings(strings) -> list[str]:
    """Every process's list of strings, concatenated in process order (a no-op alone)."""
    strings = list(strings)
    if jax.process_count() == 1:
        return strings
    import numpy as np
    from jax.experimental import multihost_utils
    mine = np.frombuffer("\n".join(strings).encode(), np.uint8) if strings else np.zeros(0, np.uint8)
    rows = allgather_rows([len(mine), len(strings)])
    sizes, counts = [r[0] for r in rows], [r[1] for r in rows]
    padded = np.zeros(max(max(sizes), 1), np.uint8)
    padded[:len(mine)] = mine
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    out = []
    for row, size, count in zip(every, sizes, counts):
        if count:
            out += bytes(row[:size]).decode().split("\n")
    return out
