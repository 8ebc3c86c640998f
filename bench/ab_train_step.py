"""A/B in one process: where train.py's step could lose to the plain `jax.value_and_grad`
+ optax step of bench_model.py (VGG-16, 32x32, fc 4096, 1000 classes, batch 128, donated
state). The parts train.py adds, one at a time, the variants interleaved round by round
so that every one sees the same machine load:

  plain tx                  bench_model's step (optax add_decayed_weights + sgd momentum)
  plain tx undonated        the same step jitted without donation (`jax.jit(step)`)
  project tx                the same step with optim.make_optimizer (injected lr and
                            plateau scale, masked decay), what train.py optimises with
  project tx +topk          + top-1/top-5 of the logits (train.py's metrics)
  project tx +finite        + the finiteness check over every updated parameter
  train.make_train_step     train.py's own pure step, `jax.jit(..., donate_argnums=0)`
  train.parallel_steps      the same step jitted over the device mesh with shardings
                            (what train.py runs)

    python bench/ab_train_step.py [--rounds 8] [--steps 4] [--variants "plain tx,..."]

Prints images/s per round, the median and the best, the ratio of medians to the first
variant, and the minor page faults per step (the kernel zero-filling freshly mapped
memory: a step that allocates its outputs afresh pays for them here).
"""
import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain tx", "plain tx undonated", "project tx", "project tx +topk", "project tx +finite",
            "train.make_train_step", "train.parallel_steps")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import bench_model
    import vgg_jax
    from vgg_jax import models, optim, train
    model = vgg_jax.create_model("vgg16", num_classes=1000, fc_widths=(4096, 4096),
                                 classifier_pool=1)
    x = np.random.default_rng(0).normal(size=(a.batch, 32, 32, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 1000, a.batch).astype(np.int32)
    plain_tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    project_tx = optim.make_optimizer(bench_model._optim_config(),
                                      models.abstract_variables(model, 32)["params"], 0.01)

    def plain_step(tx, topk=False, finite=False):
        def loss_fn(params, images, labels, rng):
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
            return train.cross_entropy(logits, labels).mean(), logits

        def step(state, batch):
            rng = jax.random.fold_in(state.rng, state.step)
            (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch["image"], batch["label"], rng)
            updates, opt_state = tx.update(g, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(loss=loss)
            if topk:
                metrics.update(top1=train.correct_topk(logits, batch["label"], 1).mean(),
                               top5=train.correct_topk(logits, batch["label"], 5).mean())
            if finite:
                metrics["finite"] = jnp.all(jnp.asarray([jnp.isfinite(loss)] + [
                    jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
        return step

    steps = {"plain tx": (plain_step(plain_tx), plain_tx),
             "plain tx undonated": (plain_step(plain_tx), plain_tx),
             "project tx": (plain_step(project_tx), project_tx),
             "project tx +topk": (plain_step(project_tx, topk=True), project_tx),
             "project tx +finite": (plain_step(project_tx, finite=True), project_tx),
             "train.make_train_step": (train.make_train_step(model, project_tx), project_tx),
             "train.parallel_steps": (None, project_tx)}
    runners = {}
    for name in a.variants.split(","):
        fn, tx = steps[name]
        t0 = time.perf_counter()
        state = train.create_state(model, tx, optim.Plateau(2, 3), jax.random.PRNGKey(0), 32)
        if fn is None:
            par = train.parallel_steps(model, tx)
            jitted, state = par.train_step, par.replicate(state)
            batch = par.global_batch({"image": x, "label": y})
        else:
            jitted = jax.jit(fn, donate_argnums=() if name.endswith("undonated") else (0,))
            batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
        box = [state]

        def run(n, jitted=jitted, box=box, batch=batch):
            for _ in range(n):
                box[0], metrics = jitted(box[0], batch)
            jax.block_until_ready(metrics)
        run(1)
        print(f"{name}: first step (compile) {time.perf_counter() - t0:.1f} s", flush=True)
        runners[name] = run
    rates = {name: [] for name in runners}
    faults = {name: [] for name in runners}
    for _ in range(a.rounds):
        for name, run in runners.items():
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            run(a.steps)
            rates[name].append(a.batch * a.steps / (time.perf_counter() - t0))
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / a.steps)
    base = float(np.median(rates[next(iter(rates))]))
    print(f"\n{'variant':<24} img/s per round{'':<{max(0, 7 * a.rounds - 15)}} median   best  "
          f"median/first  page faults/step")
    for name, r in rates.items():
        print(f"{name:<24} {' '.join(f'{v:6.1f}' for v in r)} {np.median(r):6.1f} "
              f"{max(r):6.1f}  {np.median(r) / base:5.2f}x  {np.median(faults[name]):10.0f}")


if __name__ == "__main__":
    main()
