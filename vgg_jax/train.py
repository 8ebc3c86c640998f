"""Training: a train state, pure train/eval steps, and the loop around them.

Data parallel the current JAX way: one `jax.jit` over a Mesh with a 'data' axis; batches
are global arrays sharded on it, the state is replicated, the old state is donated. With
several processes each feeds its own slice (jax.make_array_from_process_local_data).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from vgg_jax import (checkpoint, classes, conv, input_pipeline, mesh, models, optim, pixels,
                     preprocess)

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array      # raw uint32[2]; each step folds in its step number
    plateau: Any        # optax reduce_on_plateau state (the paper's lr rule)


# ----------------------------------------------------------------------------- config

MODEL_FIELDS_FROM_INIT = ("arch", "width", "fc_widths", "classifier_pool")


def adopt_init_from(config) -> None:
    """Fine-tuning conveniences: model.arch='from_init' takes the architecture (arch,
    width, fc_widths, classifier_pool) of train.init_from's weights, and
    data.normalization='from_init' the pixel convention they were trained with, so a
    fine-tuning config need not restate them. Edits `config` in place."""
    m, d, t = config.model, config.data, config.train
    wants = m.arch == "from_init" or d.normalization == "from_init"
    if not wants:
        return
    if not t.init_from:
        raise ValueError("model.arch / data.normalization = 'from_init' need "
                         "train.init_from (a weights directory or training workdir)")
    meta = checkpoint.read_meta(t.init_from)
    if m.arch == "from_init":
        for key in MODEL_FIELDS_FROM_INIT:
            value = meta["model"].get(key, getattr(m, key))
            setattr(m, key, tuple(value) if isinstance(value, list) else value)
    if d.normalization == "from_init":
        p = meta["preprocessing"]
        d.update(normalization="custom", mean=tuple(p["mean"]), std=tuple(p["std"]),
                 bgr=bool(p["bgr"]))


def validate(config) -> None:
    """Config errors as clear messages, before any data is read or anything compiles."""
    d, o, t = config.data, config.optim, config.train
    if not d.dataset:
        raise ValueError("data.dataset is empty: set --config.data.dataset to an image folder "
                         "(root/train/CLASS/*.jpg, root/val/CLASS/*.jpg) or a TFDS name")
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if o.batch_size % n_proc:
        raise ValueError(f"optim.batch_size={o.batch_size} must divide evenly over "
                         f"{n_proc} processes")
    micro = o.batch_size // max(o.grad_accum_steps, 1)
    if o.batch_size % max(o.grad_accum_steps, 1) or micro % n_dev:
        raise ValueError(f"optim.batch_size={o.batch_size} / grad_accum_steps="
                         f"{o.grad_accum_steps} must be a whole multiple of the {n_dev} devices")
    if d.recipe == "paper":
        if d.s_min > d.s_max:
            raise ValueError(f"data.s_min={d.s_min} is larger than data.s_max={d.s_max}")
        if d.image_size > d.s_min:
            raise ValueError(f"crop data.image_size={d.image_size} is larger than the training "
                             f"scale S (data.s_min={d.s_min}): Sec. 3.1 crops from images "
                             f"whose smallest side is S >= the crop")
        if d.image_size > d.eval_scale:
            raise ValueError(f"crop data.image_size={d.image_size} is larger than the test "
                             f"scale Q (data.eval_scale={d.eval_scale})")
    elif d.recipe != "small":
        raise ValueError(f"unknown data.recipe {d.recipe!r}; choose 'paper' or 'small'")
    norm = preprocess.normalization(d.normalization, d.mean, d.std, d.bgr)
    for key in ("mean", "std"):
        if len(norm[key]) not in (1, d.channels):
            raise ValueError(f"normalization {key} has {len(norm[key])} values for "
                             f"{d.channels} channels")
    if o.schedule not in optim.SCHEDULES:
        raise ValueError(f"unknown optim.schedule {o.schedule!r}; choose one of "
                         f"{', '.join(optim.SCHEDULES)}")
    if o.weight_decay_mode not in ("coupled", "decoupled"):
        raise ValueError(f"unknown optim.weight_decay_mode {o.weight_decay_mode!r}")
    if config.eval.protocol not in ("center", "dense", "multicrop", "dense+multicrop"):
        raise ValueError(f"unknown eval.protocol {config.eval.protocol!r}; choose center, "
                         "dense, multicrop or dense+multicrop")
    if t.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"train.dtype must be float32 or bfloat16, got {t.dtype!r}")
    models.resolve_arch(config.model.arch)
    models.initializers(config.model.init_scheme)
    conv.resolve_conv_impl(config.model.conv_impl)


def build_model(config, num_classes: int) -> models.VGG:
    m = config.model
    return models.create_model(
        m.arch, num_classes=num_classes, in_channels=config.data.channels, width=m.width,
        fc_widths=tuple(m.fc_widths), dropout_rate=m.dropout_rate,
        dtype=jnp.dtype(config.train.dtype), init_scheme=m.init_scheme,
        conv_impl=m.conv_impl, classifier_pool=m.classifier_pool)


def model_meta(config, model: models.VGG, class_names) -> dict:
    """What a weights directory / workdir records about the model and its inputs."""
    d = config.data
    meta = dict(
        model=dict(arch=model.arch, num_classes=model.num_classes,
                   in_channels=model.in_channels, width=model.width,
                   fc_widths=list(model.fc_widths), dropout_rate=model.dropout_rate,
                   init_scheme=model.init_scheme, conv_impl=model.conv_impl,
                   classifier_pool=model.classifier_pool),
        preprocessing=dict(
            preprocess.normalization(d.normalization, d.mean, d.std, d.bgr),
            recipe=d.recipe, image_size=d.image_size, eval_scale=d.eval_scale,
            channels=d.channels),
        class_names=list(class_names))
    described = classes.descriptions(class_names)  # ImageNet synsets -> readable names
    if described:
        meta["class_descriptions"] = described
    return meta


# ----------------------------------------------------------------------------- steps

def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def correct_topk(logits, labels, k: int):
    k = min(k, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model: models.VGG, tx, grad_accum_steps: int = 1, frozen=(),
                    pixels=None):
    """train_step(state, batch) -> (state, metrics): pure; the global batch is split into
    `grad_accum_steps` micro-batches whose gradients are averaged (same global batch,
    less memory). BatchNorm layers named in `frozen` (optim.frozen_layers) keep their
    running statistics, so a frozen layer does not change at all. With `pixels`
    (pixels.Pixels) the batch's uint8 images (and 'alpha' colour shifts) are normalised
    here, on the device; without, batch['image'] is fed to the model as it is."""

    def loss_fn(params, batch_stats, images, labels, rng):
        mutable = ["batch_stats"] if batch_stats else []
        logits, new_state = model.apply(_variables(params, batch_stats), images, train=True,
                                        rngs={"dropout": rng}, mutable=mutable)
        loss = cross_entropy(logits, labels).mean()
        return loss, (logits, new_state.get("batch_stats", batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        images, labels = batch["image"], batch["label"]
        if pixels is not None:
            images = pixels(images, batch.get("alpha"))
        if grad_accum_steps == 1:
            (loss, (logits, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, images, labels, rng)
            top1 = correct_topk(logits, labels, 1).mean()
            top5 = correct_topk(logits, labels, 5).mean()
        else:
            k = grad_accum_steps
            split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

            def micro(carry, xs):
                grads, batch_stats, i = carry
                (l, (lg, batch_stats)), g = grad_fn(state.params, batch_stats, xs[0], xs[1],
                                                    jax.random.fold_in(rng, i))
                grads = jax.tree.map(lambda a, b: a + b / k, grads, g)
                m = (l, correct_topk(lg, xs[1], 1).mean(), correct_topk(lg, xs[1], 5).mean())
                return (grads, batch_stats, i + 1), m

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, batch_stats, _), (ls, t1, t5) = jax.lax.scan(
                micro, (zeros, state.batch_stats, 0), (split(images), split(labels)))
            loss, top1, top5 = ls.mean(), t1.mean(), t5.mean()
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = {k: state.batch_stats[k] if k in frozen else v
                       for k, v in batch_stats.items()}
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        metrics = dict(loss=loss, top1_err=1 - top1, top5_err=1 - top5,
                       lr=optim.current_lr(opt_state))  # the rate this update used
        return new, metrics

    return train_step


def make_eval_step(model: models.VGG, pixels=None):
    """eval_step(state, batch) -> masked sums (loss, top1/top5 correct, count); `pixels`
    as in make_train_step."""

    def eval_step(state: TrainState, batch):
        images = batch["image"] if pixels is None else pixels(batch["image"])
        logits = model.apply(_variables(state.params, state.batch_stats), images,
                             train=False)
        mask = batch["mask"]
        return dict(loss=jnp.sum(cross_entropy(logits, batch["label"]) * mask),
                    top1=jnp.sum(correct_topk(logits, batch["label"], 1) * mask),
                    top5=jnp.sum(correct_topk(logits, batch["label"], 5) * mask),
                    count=jnp.sum(mask))

    return eval_step


def create_state(model, tx, plateau, rng, image_size: int) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    variables = models.init_variables(model, init_rng, image_size)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=train_rng, plateau=plateau.init())


class Parallel:
    """The mesh, shardings and jitted steps for one model on some devices."""

    def __init__(self, model, tx, grad_accum_steps=1, devices=None, frozen=(), pixels=None):
        self.mesh, self.data, self.replicated = mesh.data_mesh(devices)
        self.train_step = jax.jit(make_train_step(model, tx, grad_accum_steps, frozen, pixels),
                                  in_shardings=(self.replicated, self.data),
                                  out_shardings=(self.replicated, self.replicated),
                                  donate_argnums=(0,))
        self.eval_step = conv.jit_eval(make_eval_step(model, pixels),
                                         in_shardings=(self.replicated, self.data),
                                         out_shardings=self.replicated)

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def global_batch(self, local_batch: dict):
        """This process's slice -> global arrays sharded over 'data'."""
        return {k: jax.make_array_from_process_local_data(self.data, v)
                for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- init_from

def paper_preinit_layers(source_arch: str) -> list[str]:
    """Sec. 3.1: the first four conv layers and the three FC layers of net A, matched by
    name (A's conv1_1, conv2_1, conv3_1, conv3_2 have the same shapes in B..E)."""
    convs = [l.name for l in models.layer_table(source_arch) if l.kind == "conv"]
    return convs[:4] + ["fc6", "fc7", "fc8"]


def load_layers(params, batch_stats, source_variables, layers, exclude=()):
    """Copy the named layers (and their BN) from source_variables. A named layer that is
    missing or has another shape is an error naming it and both shapes."""
    src_p = source_variables["params"]
    src_bs = source_variables.get("batch_stats", {})
    params, batch_stats = dict(params), dict(batch_stats)
    loaded = []
    for name in layers:
        if name in exclude:
            continue
        for tree, src in ((params, src_p), (batch_stats, src_bs)):
            for key in (name, models.bn_name(name)) if name.startswith("conv") else (name,):
                if key not in tree:
                    continue
                if key not in src:
                    if key == name and tree is params:
                        raise ValueError(f"init_from has no layer {key!r}")
                    continue
                bad = [f"{key}/{leaf}: checkpoint shape {np.shape(src[key][leaf])} != model "
                       f"shape {np.shape(value)}" for leaf, value in sorted(tree[key].items())
                       if np.shape(src[key][leaf]) != np.shape(value)]
                if bad:  # every mismatching leaf (kernel and bias), in a fixed order
                    raise ValueError(f"init_from layer {'; '.join(bad)} (exclude it with "
                                     f"train.init_exclude)")
                tree[key] = jax.tree.map(jnp.asarray, dict(src[key]))
                loaded.append(key)
    return params, batch_stats, loaded


def init_from_checkpoint(state: TrainState, config) -> TrainState:
    t = config.train
    variables, meta = checkpoint.load_weights(t.init_from)
    exclude = tuple(x for x in t.init_exclude.split(",") if x)
    if t.init_from_layers == "paper":
        layers = paper_preinit_layers(meta["model"]["arch"])
    elif t.init_from_layers == "all":
        layers = [k for k in variables["params"] if not k.startswith("bn")]
    else:
        layers = [x for x in t.init_from_layers.split(",") if x]
    params, batch_stats, loaded = load_layers(state.params, state.batch_stats, variables,
                                              layers, exclude)
    log.info("initialised %s from %s", ", ".join(dict.fromkeys(loaded)), t.init_from)
    return state.replace(params=params, batch_stats=batch_stats)


# ----------------------------------------------------------------------------- logging

class MetricWriter:
    """metrics.jsonl (one object per line, with `step`) and TensorBoard events; only
    process 0 writes."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps(dict(step=int(step), **clean)) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k, v, int(step))
        self._tb.flush()

    def close(self):
        if self.active:
            self._jsonl.close()
            self._tb.close()


class Preemption:
    """SIGTERM sets a flag; the loop saves at the current step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the current step, then stopping")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------- the loop

def maybe_initialize_distributed(t) -> None:
    if t.get("distributed", False):
        mesh.initialize_distributed(t.get("coordinator_address"), t.get("num_processes"),
                                    t.get("process_id"))


def evaluate_protocol(config, model, state, class_names) -> dict:
    """Training-time validation with a paper protocol (config.eval.protocol): each process
    evaluates its shard of the split on its own devices (evaluate.evaluate)."""
    from vgg_jax import evaluate
    variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),  # replicated
                             _variables(state.params, state.batch_stats))
    net = evaluate.Net(model=model, variables=variables,
                       meta=model_meta(config, model, class_names))
    d, e = config.data, config.eval
    scales = ([int(s) for s in e.scales.split(",")] if e.scales else
              [d.image_size if d.recipe == "small" else d.eval_scale])
    r = evaluate.evaluate([net], d.dataset, d.eval_split, e.protocol, scales,
                          data_dir=d.data_dir or None, progress=False,
                          batch_size=max(1, e.batch_size // jax.process_count()))
    return dict(top1_err=r["top1_err"], top5_err=r["top5_err"], top1_acc=1 - r["top1_err"],
                loss=r["loss"], count=float(r["images"]))


def evaluate_split(par: Parallel, state, source, data_cfg, local_batch):
    sums = dict(loss=0.0, top1=0.0, top5=0.0, count=0.0)
    for batch in input_pipeline.eval_batches(source, data_cfg, local_batch):
        out = jax.device_get(par.eval_step(state, par.global_batch(batch)))
        for k in sums:
            sums[k] += float(out[k])
    n = max(sums["count"], 1.0)
    return dict(loss=sums["loss"] / n, top1_err=1 - sums["top1"] / n,
                top5_err=1 - sums["top5"] / n, top1_acc=sums["top1"] / n, count=sums["count"])


def _data_state_all_processes(it):
    mine = np.asarray([it.state["epoch"], it.state["offset"]], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    return {"per_process": [dict(epoch=int(e), offset=int(o)) for e, o in every],
            "skipped": len(it.skipped)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train `config` in `workdir` (resuming from its latest checkpoint) and return the
    final evaluation metrics."""
    maybe_initialize_distributed(config.train)
    adopt_init_from(config)
    validate(config)
    d, o, t = config.data, config.optim, config.train
    pidx, pcount = jax.process_index(), jax.process_count()
    os.makedirs(workdir, exist_ok=True)
    data_dir = d.data_dir or None

    train_src = input_pipeline.make_source(d.dataset, d.train_split, data_dir, pidx, pcount,
                                           d.shuffle_buffer)
    eval_src = input_pipeline.make_source(d.dataset, d.eval_split, data_dir, pidx, pcount)
    num_classes = config.model.num_classes or train_src.num_classes
    model = build_model(config, num_classes)
    local_batch = o.batch_size // pcount
    steps_per_epoch = (train_src.total_examples // pcount) // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"optim.batch_size={o.batch_size} is larger than the training split")
    total_steps = t.max_steps or int(t.num_epochs * steps_per_epoch)

    schedule = optim.learning_rate_schedule(o, steps_per_epoch, total_steps)
    rng = jax.random.PRNGKey(config.seed)
    abstract_params = models.abstract_variables(model, d.image_size)["params"]
    tx = optim.make_optimizer(o, abstract_params, schedule)
    plateau = optim.Plateau(o.plateau_patience, o.plateau_max_decays)
    frozen = optim.frozen_layers(abstract_params, tuple(o.freeze))
    if frozen:
        log.info("frozen layers (params and BN statistics fixed): %s", ", ".join(frozen))
    par = Parallel(model, tx, o.grad_accum_steps, frozen=frozen, pixels=pixels.for_data(d))
    state = jax.jit(functools.partial(create_state, model, tx, plateau, image_size=d.image_size),
                    out_shardings=par.replicated)(rng)

    mngr = checkpoint.manager(workdir, t.keep_checkpoints)
    data_state = None
    if mngr.latest_step() is not None:
        step0 = mngr.latest_step()
        shardings = jax.tree.map(lambda _: par.replicated, state)
        state, saved = checkpoint.restore(mngr, step0, checkpoint.abstract(state, shardings))
        data_state = saved["per_process"][pidx]
        log.info("resumed from step %d in %s", step0, workdir)
    elif t.init_from:
        state = par.replicate(init_from_checkpoint(state, config))
    if pidx == 0:
        with open(os.path.join(workdir, "meta.json"), "w") as f:
            json.dump(model_meta(config, model, train_src.class_names), f, indent=2)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    it = input_pipeline.TrainIterator(train_src, d, local_batch, config.seed, data_state)
    writer = MetricWriter(workdir)
    preempt = Preemption()
    step = int(state.step)
    last_saved = step if mngr.latest_step() is not None else None
    bar = None
    if pidx == 0 and t.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def save(step, metrics=None):
        nonlocal last_saved
        if last_saved == step:
            return
        checkpoint.save(mngr, step, state, _data_state_all_processes(it), metrics)
        last_saved = step

    def check_finite(m, step):
        loss = float(m["loss"])
        if not math.isfinite(loss):
            where = (f"the last good checkpoint (step {last_saved}) in {workdir}/checkpoints is "
                     f"intact" if last_saved is not None else "no checkpoint was saved yet")
            raise FloatingPointError(
                f"loss is {loss} at step {step}: training stopped; {where}. Try a lower "
                f"optim.learning_rate, optim.grad_clip_norm > 0, or model.init_scheme.")

    history, pending, t_log, result = [], None, time.time(), {}
    try:
        while step < total_steps:
            batch = par.global_batch(next(it))
            state, metrics = par.train_step(state, batch)
            step += 1
            if pending is not None:
                check_finite(*pending)
            pending = (metrics, step)
            history.append(metrics)
            if bar is not None:
                bar.update(1)
            if step % t.log_every_steps == 0 or step == total_steps:
                check_finite(*pending)
                avg = {k: float(np.mean([jax.device_get(h[k]) for h in history]))
                       for k in history[0]}
                dt = time.time() - t_log
                avg.update(step_time=dt / len(history),
                           images_per_sec=len(history) * o.batch_size / dt,
                           skipped_images=len(it.skipped))
                writer.write(step, {f"train_{k}": v for k, v in avg.items()})
                if bar is not None:
                    bar.set_postfix(loss=f"{avg['loss']:.3f}", err=f"{avg['top1_err']:.3f}")
                history, t_log = [], time.time()
            end_of_epoch = step % steps_per_epoch == 0
            epoch = step // steps_per_epoch
            if (end_of_epoch and epoch % t.eval_every_epochs == 0) or step == total_steps:
                check_finite(*pending)
                if config.eval.protocol == "center":
                    result = evaluate_split(par, state, eval_src, d, local_batch)
                else:
                    result = evaluate_protocol(config, model, state, train_src.class_names)
                writer.write(step, {f"eval_{k}": v for k, v in result.items()})
                log.info("step %d (epoch %d): eval top-1 error %.4f, top-5 error %.4f",
                         step, epoch, result["top1_err"], result["top5_err"])
                if o.schedule == "paper":
                    new_plateau = plateau.update(jax.device_get(state.plateau), result["top1_err"])
                    opt_state = optim.set_lr_scale(jax.device_get(state.opt_state),
                                                   new_plateau.scale)
                    state = par.replicate(state.replace(plateau=new_plateau, opt_state=opt_state))
                save(step, {"top1_acc": result["top1_acc"]})
            elif step % t.checkpoint_every_steps == 0:
                check_finite(*pending)
                save(step)
            if preempt.requested:
                check_finite(*pending)
                save(step)
                log.warning("preempted: checkpoint saved at step %d", step)
                break
        if step >= total_steps:
            save(step, {"top1_acc": result["top1_acc"]} if result else None)
    finally:
        preempt.restore()
        writer.close()
        if bar is not None:
            bar.close()
        mngr.close()
    result = dict(result, step=step, skipped_images=len(it.skipped), split=d.eval_split)
    return result
