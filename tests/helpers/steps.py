"""Run a few train steps of a tiny VGG and print a JSON summary of the resulting params.

Used by tests/test_train.py in subprocesses, because fake CPU devices
(--xla_force_host_platform_device_count) and jax.distributed must be set up before JAX
starts. Mode:
  sharded ARCH    one step on 1 device and on all devices -> max |param diff|
(Several processes run through train.py itself: tests/test_pods.py.)
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np


def setup(arch, batch=16):
    from vgg_jax import models, optim, train
    sys.path.insert(0, "tests")
    from conftest import load_config
    c = load_config()
    c.model.arch, c.model.width, c.model.fc_widths = arch, 1 / 16, (16, 16)
    c.optim.batch_size = batch
    c.optim.warmup_epochs, c.optim.schedule, c.optim.learning_rate = 0, "constant", 0.05
    model = train.build_model(c, 10)
    tx = optim.make_optimizer(c.optim, models.abstract_variables(model, 32)["params"],
                              optim.learning_rate_schedule(c.optim, 10, 100))
    state = train.create_state(model, tx, optim.Plateau(2, 3), jax.random.PRNGKey(0), 32)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
                "label": rng.integers(0, 10, batch).astype(np.int32)} for _ in range(3)]
    return c, model, tx, state, batches


def sharded(arch):
    from vgg_jax import train
    c, model, tx, state, batches = setup(arch)
    out = {}
    for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
        par = train.parallel_steps(model, tx, devices=devices)
        s = par.replicate(jax.tree.map(jnp.copy, state))
        s, m = par.train_step(s, par.global_batch(batches[0]))
        out[name] = jax.device_get(s)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(out["one"].params), jax.tree.leaves(out["all"].params)))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(out["one"].params), jax.tree.leaves(jax.device_get(state.params))))
    bs = [float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(out["one"].batch_stats), jax.tree.leaves(out["all"].batch_stats))]
    c.optim.batch_size = 12
    try:
        train.validate(c)
        err = ""
    except ValueError as e:
        err = str(e)
    print(json.dumps(dict(devices=jax.device_count(), diff=diff, moved=moved,
                          bn_diff=max(bs, default=0.0), validate_error=err)))


if __name__ == "__main__":
    sharded(sys.argv[2])
