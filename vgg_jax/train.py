"""Training: a train state, pure train/eval steps, and the loop around them.

Data parallel the current JAX way: one `jax.jit` over a Mesh with a 'data' axis
(`mesh.DataParallel`); batches are global arrays sharded on it, the state is replicated,
the old state is donated. With several processes each feeds its own slice.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vgg_jax import (checkpoint, conv, eval_data, input_pipeline, lease, mesh, metric_log,
                     models, objectives, optim, pixels, preemption, published, storage,
                     weights)
from vgg_jax.configuration import validate
from vgg_jax.errors import UserError

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array      # raw uint32[2]; each step folds in its step number
    plateau: Any        # optax reduce_on_plateau state (the paper's lr rule)


def build_model(config, num_classes: int) -> models.VGG:
    """The model of config.model. With the paper's pre-initialisation
    (train.init_from_layers='paper') the layers not copied from net A are drawn from the
    paper's N(0, 0.01), whatever model.init_scheme says (Glorot is the paper's
    alternative *without* pre-training)."""
    m, t = config.model, config.train
    init_scheme = "paper" if t.init_from and t.init_from_layers == "paper" else m.init_scheme
    return models.create_model(
        m.arch, num_classes=num_classes, in_channels=config.data.channels, width=m.width,
        fc_widths=tuple(m.fc_widths), dropout_rate=m.dropout_rate,
        dtype=jnp.dtype(t.dtype), init_scheme=init_scheme, conv_impl=m.conv_impl,
        classifier_pool=m.classifier_pool, pool_ceil=m.pool_ceil,
        box_head=m.get("box_head", ""), bias_init=m.get("bias_init", "zeros"))


# ----------------------------------------------------------------------------- steps

cross_entropy, correct_topk = objectives.cross_entropy, objectives.correct_topk


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model: models.VGG, tx, grad_accum_steps: int = 1, frozen=(),
                    pixels=None):
    """train_step(state, batch) -> (state, metrics): pure; the global batch is split into
    `grad_accum_steps` micro-batches whose gradients are averaged (same global batch,
    less memory). BatchNorm layers named in `frozen` (optim.frozen_layers) keep their
    running statistics, so a frozen layer does not change at all. With `pixels`
    (pixels.Pixels) the batch's uint8 images (and 'alpha' colour shifts) are normalised
    here, on the device; without, batch['image'] is fed to the model as it is.
    metrics['finite'] says whether the loss and every updated parameter are finite (the
    loop saves no state whose update was not). The loss and the counts are the model's
    objective (`objectives.of`: class scores, or a box head's boxes)."""
    objective = objectives.of(model)

    def loss_fn(params, batch_stats, images, target, rng):
        mutable = ["batch_stats"] if batch_stats else []
        outputs, new_state = model.apply(_variables(params, batch_stats), images, train=True,
                                         rngs={"dropout": rng}, mutable=mutable)
        loss = objective.loss(outputs, target).mean()
        return loss, (outputs, new_state.get("batch_stats", batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        images, target = batch["image"], objective.target(batch)
        if pixels is not None:
            images = pixels(images, batch.get("alpha"))
        if grad_accum_steps == 1:
            (loss, (outputs, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, images, target, rng)
            top1 = objective.correct(outputs, target, 1).mean()
            top5 = objective.correct(outputs, target, 5).mean()
        else:
            k = grad_accum_steps
            split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

            def micro(carry, xs):
                grads, batch_stats, i = carry
                (l, (out, batch_stats)), g = grad_fn(state.params, batch_stats, xs[0], xs[1],
                                                     jax.random.fold_in(rng, i))
                grads = jax.tree.map(lambda a, b: a + b / k, grads, g)
                m = (l, objective.correct(out, xs[1], 1).mean(),
                     objective.correct(out, xs[1], 5).mean())
                return (grads, batch_stats, i + 1), m

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, batch_stats, _), (ls, t1, t5) = jax.lax.scan(
                micro, (zeros, state.batch_stats, 0),
                (split(images), jax.tree.map(split, target)))
            loss, top1, top5 = ls.mean(), t1.mean(), t5.mean()
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = {k: state.batch_stats[k] if k in frozen else v
                       for k, v in batch_stats.items()}
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        metrics = dict(loss=loss, top1_err=1 - top1, top5_err=1 - top5,
                       lr=optim.current_lr(opt_state),  # the rate this update used
                       # whether the state this step returns may be saved as good
                       finite=jnp.all(jnp.asarray([jnp.isfinite(loss)] + [
                           jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])))
        return new, metrics

    return train_step


def make_eval_step(model: models.VGG, pixels=None):
    """eval_step(state, batch) -> masked sums (loss, top1/top5 correct, count) of the
    model's objective; `pixels` as in make_train_step."""
    objective = objectives.of(model)

    def eval_step(state: TrainState, batch):
        images = batch["image"] if pixels is None else pixels(batch["image"])
        outputs = model.apply(_variables(state.params, state.batch_stats), images,
                              train=False)
        mask, target = batch["mask"], objective.target(batch)
        return dict(loss=jnp.sum(objective.loss(outputs, target) * mask),
                    top1=jnp.sum(objective.correct(outputs, target, 1) * mask),
                    top5=jnp.sum(objective.correct(outputs, target, 5) * mask),
                    count=jnp.sum(mask))

    return eval_step


def parallel_steps(model, tx, grad_accum_steps: int = 1, frozen=(), pixels=None,
                   devices=None) -> mesh.DataParallel:
    """The train and eval steps of `model`, jitted data-parallel over `devices` (all)."""
    return mesh.DataParallel(make_train_step(model, tx, grad_accum_steps, frozen, pixels),
                             make_eval_step(model, pixels), devices)


def create_state(model, tx, plateau, rng, image_size: int) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    variables = models.init_variables(model, init_rng, image_size)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=train_rng, plateau=plateau.init())


# ----------------------------------------------------------------------------- the loop

def init_from_checkpoint(state: TrainState, config) -> TrainState:
    """`state` with train.init_from's layers copied in (`weights.init_layers`)."""
    params, batch_stats = weights.init_layers(state.params, state.batch_stats, config.train)
    return state.replace(params=params, batch_stats=batch_stats)


def due(count: int, every: int) -> bool:
    """Is it time: `count` (steps or epochs) a positive multiple of `every` (0: never)."""
    return every > 0 and count > 0 and count % every == 0


@dataclasses.dataclass
class Run:
    """What the loop needs, from `setup`."""
    config: ml_collections.ConfigDict
    workdir: str
    model: models.VGG
    par: mesh.DataParallel
    state: TrainState
    plateau: optim.Plateau
    mngr: Any
    it: input_pipeline.TrainIterator
    eval_src: Any
    class_names: list
    steps_per_epoch: int
    total_steps: int
    validation_pending: bool = False  # the checkpoint's step was saved before its validation


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Validate the config, open the data, build the model, optimiser and jitted steps,
    and restore the newest readable checkpoint of `workdir` (or initialise, from
    train.init_from if set)."""
    t = config.train
    published.use_cache(t.get("weights_cache"))
    weights.adopt_init_from(config)
    validate(config)
    d, o = config.data, config.optim
    pidx, pcount = jax.process_index(), jax.process_count()
    storage.makedirs(workdir)
    data_dir = d.data_dir or None
    boxes = bool(config.model.get("box_head"))  # a box net trains on its data's boxes
    train_src = input_pipeline.make_source(d.dataset, d.train_split, data_dir, pidx, pcount,
                                           d.shuffle_buffer, boxes)
    eval_src = input_pipeline.make_source(d.dataset, d.eval_split, data_dir, pidx, pcount,
                                          boxes=boxes)
    if train_src.multi_label:
        raise UserError(f"{d.dataset} has several labels per image; training here is "
                        f"single-label soft-max (embed it, or `vgg-jax transfer` for its mAP)")
    if 0 < config.model.num_classes < train_src.num_classes:  # labels past fc8: NaN loss
        raise UserError(f"model.num_classes={config.model.num_classes}, but {d.dataset} has "
                        f"{train_src.num_classes} classes (labels 0..{train_src.num_classes - 1}); "
                        f"set model.num_classes=0 to take the dataset's")
    model = build_model(config, config.model.num_classes or train_src.num_classes)
    local_batch = o.batch_size // pcount
    steps_per_epoch = (train_src.total_examples // pcount) // local_batch
    if steps_per_epoch == 0:
        raise UserError(f"optim.batch_size={o.batch_size} is larger than the training split")
    total_steps = t.max_steps or int(t.num_epochs * steps_per_epoch)

    schedule = optim.learning_rate_schedule(o, steps_per_epoch, total_steps)
    abstract_params = models.abstract_variables(model, d.image_size)["params"]
    tx = optim.make_optimizer(o, abstract_params, schedule)
    plateau = optim.Plateau(o.plateau_patience, o.plateau_max_decays)
    frozen = optim.frozen_layers(abstract_params, tuple(o.freeze))
    if frozen:
        log.info("frozen layers (params and BN statistics fixed): %s", ", ".join(frozen))
        # frozen BN normalises with its running statistics in training too
        model = model.clone(frozen_bn=tuple(n for n in frozen if n.startswith("bn")))
    par = parallel_steps(model, tx, o.grad_accum_steps, frozen, pixels.for_data(d))
    state = jax.jit(functools.partial(create_state, model, tx, plateau, image_size=d.image_size),
                    out_shardings=par.replicated,
                    compiler_options=conv.init_compiler_options())(jax.random.PRNGKey(config.seed))

    mngr = checkpoint.manager(workdir, t.keep_checkpoints)
    changes = checkpoint.check_config(config, workdir, mngr)
    data_state = None
    shardings = jax.tree.map(lambda _: par.replicated, state)
    step0, restored, saved = checkpoint.restore_latest(
        mngr, checkpoint.abstract(state, shardings), checkpoint.describe_changes(changes))
    if step0 is not None:
        state = restored
        data_state = input_pipeline.resume_position(saved["per_process"], pidx, pcount)
        log.info("resumed from step %d in %s on %d devices", step0, workdir, jax.device_count())
    elif t.init_from:
        state = par.replicate(init_from_checkpoint(state, config))
    if pidx == 0:
        storage.write_text(storage.join(workdir, "meta.json"), json.dumps(
            weights.model_meta(model, d, train_src.class_names), indent=2))
        checkpoint.record_config(workdir, config, step0 or 0, changes)
    it = input_pipeline.TrainIterator(train_src, d, local_batch, config.seed, data_state)
    return Run(config, workdir, model, par, state, plateau, mngr, it, eval_src,
               train_src.class_names, steps_per_epoch, total_steps,
               validation_pending=bool(saved and saved.get("validation_pending")))


def evaluate_model(run: Run, state: TrainState, stop=None) -> dict | None:
    """Validation on config.data.eval_split with config.eval.protocol: 'center' through the
    jitted eval step, the paper's protocols through `evaluate.evaluate` (each process its
    shard). `stop()` is asked before every batch (the paper's protocols: every image, and
    only in a single process, whose calls need not match another's); when it says so the
    validation ends at once and this returns None."""
    d, e = run.config.data, run.config.eval
    if e.protocol == "center":
        sums = dict(loss=0.0, top1=0.0, top5=0.0, count=0.0)
        # eval.batch_size is global
        local = mesh.per_process_batch(max(1, e.batch_size // jax.process_count()))
        skipped = eval_data.Skipped(run.eval_src)
        for batch in eval_data.eval_batches(run.eval_src, d, local, skipped=skipped):
            if stop is not None and stop():
                return None
            out = jax.device_get(run.par.eval_step(state, run.par.global_batch(batch)))
            for k in sums:
                sums[k] += float(out[k])
        n = max(sums["count"], 1.0)
        return dict(loss=sums["loss"] / n, top1_err=1 - sums["top1"] / n,
                    top5_err=1 - sums["top5"] / n, top1_acc=sums["top1"] / n,
                    count=sums["count"], **skipped.summary())
    from vgg_jax import evaluate
    variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),  # replicated
                             _variables(state.params, state.batch_stats))
    net = weights.Net(model=run.model, variables=variables,
                      meta=weights.model_meta(run.model, d, run.class_names))
    r = evaluate.evaluate([net], d.dataset, d.eval_split, e.protocol,
                          [int(q) for q in e.scales] or evaluate.default_scales(d),
                          data_dir=d.data_dir or None, progress=False,
                          batch_size=max(1, e.batch_size // jax.process_count()),
                          stop=stop if jax.process_count() == 1 else None)
    if r is None:
        return None
    return dict(top1_err=r["top1_err"], top5_err=r["top5_err"], top1_acc=1 - r["top1_err"],
                loss=r["loss"], count=float(r["images"]), skipped=r["skipped"],
                skipped_images=r["skipped_images"])


class Saver:
    """Saves the run's checkpoints (never the same step twice) and knows the last one."""

    def __init__(self, run: Run):
        self.run = run
        self.last = run.mngr.latest_step()

    def save(self, step: int, state: TrainState, metrics: dict | None = None,
             validated: bool = True):
        """Start saving `step` (asynchronously); `validated=False`: the validation due at
        it did not finish, and a resumed run does it first."""
        if self.last == step:
            return
        rows = mesh.allgather_rows([self.run.it.state["epoch"], self.run.it.state["offset"]])
        data_state = {"per_process": [dict(epoch=e, offset=o) for e, o in rows],
                      "skipped": len(self.run.it.skipped), "validation_pending": not validated}
        checkpoint.save(self.run.mngr, step, state, data_state, metrics)
        self.last = step

    def check_finite(self, metrics, step: int):
        """Raise unless step `step` (whose metrics these are) computed a finite loss and
        a finite update: only then may the state it returned be saved."""
        loss = float(metrics["loss"])
        if math.isfinite(loss) and bool(metrics["finite"]):
            return
        what = (f"loss is {loss} at step {step}" if not math.isfinite(loss) else
                f"the update of step {step} made parameters non-finite (its loss was "
                f"{loss:.4g})")
        where = (f"the last good checkpoint (step {self.last}) in {self.run.workdir}/"
                 f"checkpoints is intact" if self.last is not None else
                 "no checkpoint was saved yet")
        raise FloatingPointError(
            f"{what}: training stopped; {where}. Try a lower optim.learning_rate, "
            f"optim.grad_clip_norm > 0, or model.init_scheme.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir` (resuming from its latest checkpoint) and return the
    final evaluation metrics."""
    t = config.train
    if t.distributed:  # before anything asks JAX about devices
        mesh.initialize_distributed(t.coordinator_address or None, t.num_processes or None,
                                    None if t.process_id < 0 else t.process_id)
    workdir = storage.absolute(workdir)
    storage.check_reachable(workdir)
    lock = lease.hold(workdir, t.workdir_lease_s) if jax.process_index() == 0 else None
    try:
        return loop(setup(config, workdir))
    finally:
        if lock is not None:
            lock.release()


def loop(run: Run) -> dict:
    """The training procedure over a set-up run: steps, logging, validation (with the
    paper's plateau rule), checkpoints, preemption; returns the last validation result."""
    config, workdir = run.config, run.workdir
    o, t = config.optim, config.train
    state, step, total = run.state, int(run.state.step), run.total_steps
    saver, writer = Saver(run), metric_log.MetricWriter(workdir)
    preempt = preemption.Preemption(run.mngr)
    bar = None
    if jax.process_index() == 0 and t.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    history, t_log, result, previous, stopped = [], time.time(), {}, None, False

    def validate(state):
        """The validation due at `step`: (state, its result), or (state, None) when a
        preemption ended it (its batches are ticks of `preempt` too)."""
        log.info("step %d: validating on %s", step, config.data.eval_split)
        r = evaluate_model(run, state, stop=preempt.reached)
        if r is None:
            return state, None
        writer.write(step, {f"eval_{k}": v for k, v in r.items()
                            if k != "skipped_images"})  # the names are logged
        log.info("step %d (epoch %d): eval top-1 error %.4f, top-5 error %.4f",
                 step, step // run.steps_per_epoch, r["top1_err"], r["top5_err"])
        if o.schedule == "paper":  # Sec. 3.1: lr / 10 when validation stops improving
            plateau, opt_state = run.plateau.after_validation(
                jax.device_get(state.plateau), jax.device_get(state.opt_state), r["top1_err"])
            state = run.par.replicate(state.replace(plateau=plateau, opt_state=opt_state))
        return state, r

    try:
        if run.validation_pending:  # preempted during this step's validation: it comes first
            state, r = validate(state)
            stopped = r is None  # again: the step's checkpoint is saved already
            result = r or {}
        while step < total and not stopped:
            state, metrics = run.par.train_step(state, run.par.global_batch(next(run.it)))
            step += 1
            if previous is not None:  # the previous step's results, read while this one runs
                saver.check_finite(previous, step - 1)
            previous = metrics
            history.append(metrics)
            if bar is not None:
                bar.update(1)
            epoch, into_epoch = divmod(step, run.steps_per_epoch)
            if due(step, t.log_every_steps) or step == total:
                saver.check_finite(metrics, step)
                avg = {k: float(np.mean([jax.device_get(h[k]) for h in history]))
                       for k in history[0] if k != "finite"}
                dt = time.time() - t_log
                avg.update(step_time=dt / len(history),
                           images_per_sec=len(history) * o.batch_size / dt,
                           skipped_images=len(run.it.skipped))
                writer.write(step, {f"train_{k}": v for k, v in avg.items()})
                if bar is not None:
                    bar.set_postfix(loss=f"{avg['loss']:.3f}", err=f"{avg['top1_err']:.3f}")
                history, t_log = [], time.time()
            if (into_epoch == 0 and due(epoch, t.eval_every_epochs)) or step == total:
                saver.check_finite(metrics, step)
                state, r = validate(state)
                if r is None:  # the step is finished, its validation is not: resumed first
                    saver.save(step, state, validated=False)
                    log.warning("preempted during validation: checkpoint saved at step %d",
                                step)
                    stopped = True
                    break
                result = r
                saver.save(step, state, {"top1_acc": result["top1_acc"]})
            elif due(step, t.checkpoint_every_steps):
                saver.check_finite(metrics, step)
                saver.save(step, state)
            if preempt.reached():  # the same answer on every process at the same step
                saver.check_finite(metrics, step)
                saver.save(step, state)
                log.warning("preempted: checkpoint saved at step %d", step)
                stopped = True
                break
        if step >= total and not stopped:
            saver.save(step, state, {"top1_acc": result["top1_acc"]} if result else None)
    finally:
        preempt.close()
        writer.close()
        if bar is not None:
            bar.close()
        run.mngr.close()  # waits for a save still being written
    return dict(result, step=step, split=config.data.eval_split,
                train_skipped=len(run.it.skipped), train_skipped_images=list(run.it.skipped))
