"""Gather each process's list of strings over 2 processes on 127.0.0.1 (gloo) and print
the result as JSON. Used by tests/test_pods.py. Usage: gather_strings.py PROCESS_ID PORT"""
import json
import sys

import jax


def main(pid, port):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    from vgg_jax import mesh
    mine = [["/data/cat/broken 1.jpg", "voc/2007:test example #3"], []][int(pid)]
    print(json.dumps(mesh.allgather_strings(mine)))


if __name__ == "__main__":
    main(*sys.argv[1:])
