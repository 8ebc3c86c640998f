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


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize, once. Without an address JAX finds the cluster itself
    (TPU pods, SLURM, ...); CPU processes talk through gloo collectives."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address or jax.default_backend() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)


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
