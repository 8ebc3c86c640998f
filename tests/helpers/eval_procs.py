"""Evaluate a weights directory on the bundled digits and print the result as JSON.

Used by tests/test_evaluate.py in subprocesses, because fake CPU devices
(--xla_force_host_platform_device_count) and jax.distributed must be set up before JAX
starts. Usage: eval_procs.py WEIGHTS [PROCESS_ID PORT NUM_PROCESSES]
"""
import json
import sys

import jax


def main(weights, pid=None, port=None, nproc=None):
    if pid is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(nproc),
                                   process_id=int(pid))
    from vgg_jax import evaluate
    nets = [evaluate.Net(weights)]
    r = evaluate.evaluate(nets, "vgg_digits", "test", "dense+multicrop", [40], progress=False,
                          batch_size=32)
    print(json.dumps(dict(r, local_devices=jax.local_device_count())))


if __name__ == "__main__":
    main(*sys.argv[1:])
