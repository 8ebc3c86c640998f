"""Sec. 3.1's optimiser as optax transforms: SGD, momentum 0.9, weight decay 5e-4 (its own
transform, not a loss term), and the learning-rate schedules.

coupled   (torch.optim.SGD(weight_decay=...); the paper's decay, as a gradient term):
          buf = m * buf + (g + wd * p);            p -= lr * buf
          Caffe keeps the rate inside the buffer (buf = m * buf + lr * (g + wd * p);
          p -= buf): the same steps while lr is constant, but after a drop of lr Caffe's
          buffer still carries the old rate for a while and this form's does not.
decoupled (weights decay outside momentum, scaled by lr):
          buf = m * buf + g;                       p -= lr * (buf + wd * p)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vgg_jax import models
from vgg_jax.choices import SCHEDULES, WEIGHT_DECAY_MODES
from vgg_jax.errors import UserError, check_choice



def decay_mask(params, decay_biases_and_bn: bool):
    """True where weight decay applies: every param, or only conv/fc kernels."""
    if decay_biases_and_bn:
        return jax.tree.map(lambda _: True, params)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


FREEZE_GROUPS = {
    "convs": lambda name: name.startswith(("conv", "bn", "lrn")),   # the feature extractor
    "fcs": lambda name: name in ("fc6", "fc7"),                       # all FC but the head
}


def frozen_layers(params, freeze) -> tuple[str, ...]:
    """optim.freeze -> the layer names whose params stay fixed. Entries are layer names
    (conv1_1, fc6) or the groups 'convs' (every conv layer and its BN) and 'fcs' (fc6, fc7);
    a frozen conv layer takes its BatchNorm (bn1_1 for conv1_1) with it."""
    layers = sorted({k[0] for k in traverse_util.flatten_dict(params)})
    out = set()
    for entry in freeze:
        if entry in FREEZE_GROUPS:
            out |= {n for n in layers if FREEZE_GROUPS[entry](n)}
        elif entry in layers:
            out.add(entry)
            if entry.startswith("conv") and models.bn_name(entry) in layers:
                out.add(models.bn_name(entry))
        else:
            raise UserError(f"optim.freeze names {entry!r}, which the model does not have; "
                             f"use layer names ({', '.join(layers)}) or groups "
                             f"({', '.join(FREEZE_GROUPS)})")
    return tuple(sorted(out))


def freeze_labels(params, frozen: tuple[str, ...]):
    """'frozen' for every param of the named layers (see frozen_layers), else 'train'."""
    frozen = frozen_layers(params, frozen)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: "frozen" if k[0] in frozen else "train" for k in flat})


def learning_rate_schedule(o, steps_per_epoch: int, total_steps: int):
    """A step -> lr function. 'paper' is constant here: its divisions by 10 happen on
    validation plateaus (`Plateau`), applied as a scale on this value."""
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    lr = o.learning_rate
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(total_steps, warmup + 1))
    if o.schedule == "step":
        main = optax.piecewise_constant_schedule(
            lr, {int(e * steps_per_epoch) - warmup: 0.1 for e in o.step_epochs})
    else:
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(o, params, schedule):
    """optax transform with `learning_rate` (and `lr_scale`, set by the plateau rule)
    exposed as injected hyper-parameters."""

    def sgd(learning_rate, lr_scale):
        mask = decay_mask(params, o.decay_biases_and_bn)
        momentum = optax.trace(decay=o.momentum, nesterov=o.nesterov)
        decay = optax.add_decayed_weights(o.weight_decay, mask)
        check_choice("optim.weight_decay_mode", o.weight_decay_mode, WEIGHT_DECAY_MODES)
        parts = [decay, momentum] if o.weight_decay_mode == "coupled" else [momentum, decay]
        if o.grad_clip_norm > 0:
            parts.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
        return optax.chain(*parts, optax.scale(-learning_rate * lr_scale))

    tx = optax.inject_hyperparams(sgd)(learning_rate=schedule, lr_scale=1.0)
    if o.freeze:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   freeze_labels(params, tuple(o.freeze)))
    return tx


def hyperparams(opt_state):
    """The injected hyper-parameter dict, through multi_transform if present."""
    if isinstance(opt_state, optax.MultiTransformState):
        opt_state = opt_state.inner_states["train"].inner_state
    return opt_state.hyperparams


def current_lr(opt_state):
    h = hyperparams(opt_state)
    return h["learning_rate"] * h["lr_scale"]


def set_lr_scale(opt_state, scale):
    """A copy of opt_state with the plateau scale replaced (host-side, between steps)."""
    h = hyperparams(opt_state)
    h["lr_scale"] = jnp.asarray(scale, jnp.asarray(h["lr_scale"]).dtype)
    return opt_state


class Plateau:
    """The paper's rule: divide the lr by 10 when validation accuracy stops improving,
    at most `max_decays` times. optax.contrib.reduce_on_plateau does the bookkeeping on
    the validation error (lower is better); its state lives in the train state."""

    def __init__(self, patience: int, max_decays: int):
        self.tx = optax.contrib.reduce_on_plateau(
            factor=0.1, patience=patience, rtol=0.0, atol=1e-6, cooldown=0,
            accumulation_size=1, min_scale=0.1 ** max_decays)

    def init(self):
        return self.tx.init({})

    def update(self, state, val_error: float):
        _, state = self.tx.update({}, state, value=jnp.asarray(val_error, jnp.float32))
        return state

    def after_validation(self, plateau_state, opt_state, val_error: float):
        """(plateau_state, opt_state) after one validation: the plateau rule's bookkeeping
        and the learning-rate scale it gives, written into the optimiser state."""
        plateau_state = self.update(plateau_state, val_error)
        return plateau_state, set_lr_scale(opt_state, plateau_state.scale)
