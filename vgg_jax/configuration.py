"""The training configuration's rules: every value's allowed set or range, checked before
any data is read or anything compiles, and command-line overrides checked against the
config's keys. Each mistake is one `UserError` line naming the key."""
from __future__ import annotations

import os

import jax

from vgg_jax import choices, models, preprocess
from vgg_jax.errors import UserError, check_choice, closest

# key: (lowest, highest, whether the lowest itself is allowed); None = unbounded
RANGES = {
    "model.width": (0, 16, False), "model.dropout_rate": (0, 1, True),
    "model.num_classes": (0, None, True), "model.classifier_pool": (1, None, True),
    "data.image_size": (models.MIN_SIZE, None, True), "data.channels": (1, None, True),
    "data.s_min": (models.MIN_SIZE, None, True), "data.s_max": (models.MIN_SIZE, None, True),
    "data.eval_scale": (models.MIN_SIZE, None, True), "data.pad": (0, None, True),
    "data.shuffle_buffer": (1, None, True), "optim.batch_size": (1, None, True),
    "optim.grad_accum_steps": (1, None, True), "optim.learning_rate": (0, None, False),
    "optim.momentum": (0, 1, True), "optim.weight_decay": (0, None, True),
    "optim.grad_clip_norm": (0, None, True), "optim.warmup_epochs": (0, None, True),
    "optim.plateau_patience": (1, None, True), "optim.plateau_max_decays": (0, None, True),
    "train.num_epochs": (0, None, False), "train.max_steps": (0, None, True),
    "train.log_every_steps": (1, None, True), "train.eval_every_epochs": (1, None, True),
    "train.checkpoint_every_steps": (1, None, True), "train.keep_checkpoints": (1, None, True),
    "train.workdir_lease_s": (3, None, True), "eval.batch_size": (1, None, True),
}


def check_ranges(config) -> None:
    for key, (low, high, low_ok) in RANGES.items():
        section, field = key.split(".")
        value = config[section][field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}={value!r} must be a number")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = (f"in {'[' if low_ok else '('}{low}, {high}]" if high is not None else
                     f"{'>=' if low_ok else '>'} {low}")
            raise UserError(f"{key}={value} is out of range: it must be {bound}")


def validate(config) -> None:
    """Config errors as clear messages, before any data is read or anything compiles."""
    d, o, t = config.data, config.optim, config.train
    check_ranges(config)
    if t.init_from_required and not t.init_from:
        raise UserError(f"this config fine-tunes {t.init_from_required} (Sec. 3.1): set "
                        f"--config.train.init_from=WORKDIR of that run, or "
                        f"--config.train.init_from_required='' to train from scratch")
    if not d.dataset:
        raise UserError("data.dataset is empty: set --config.data.dataset to an image folder "
                        "(root/train/CLASS/*.jpg, root/val/CLASS/*.jpg) or a TFDS name")
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if o.batch_size % n_proc:
        raise UserError(f"optim.batch_size={o.batch_size} must divide evenly over "
                        f"{n_proc} processes")
    micro = o.batch_size // max(o.grad_accum_steps, 1)
    if o.batch_size % max(o.grad_accum_steps, 1) or micro % n_dev:
        raise UserError(f"optim.batch_size={o.batch_size} / grad_accum_steps="
                        f"{o.grad_accum_steps} must be a whole multiple of the {n_dev} devices")
    check_choice("data.recipe", d.recipe, choices.RECIPES)
    if d.recipe == "paper":
        if d.s_min > d.s_max:
            raise UserError(f"data.s_min={d.s_min} is larger than data.s_max={d.s_max}")
        if d.image_size > d.s_min:
            raise UserError(f"crop data.image_size={d.image_size} is larger than the training "
                            f"scale S (data.s_min={d.s_min}): Sec. 3.1 crops from images "
                            f"whose smallest side is S >= the crop")
        if d.image_size > d.eval_scale:
            raise UserError(f"crop data.image_size={d.image_size} is larger than the test "
                            f"scale Q (data.eval_scale={d.eval_scale})")
    check_choice("data.normalization", d.normalization, (*choices.NORMALIZATIONS, "custom"))
    norm = preprocess.normalization(d.normalization, d.mean, d.std, d.bgr)
    for key in ("mean", "std"):
        if len(norm[key]) not in (1, d.channels):
            raise UserError(f"normalization {key} has {len(norm[key])} values for "
                            f"{d.channels} channels")
    check_choice("optim.schedule", o.schedule, choices.SCHEDULES)
    check_choice("optim.weight_decay_mode", o.weight_decay_mode, choices.WEIGHT_DECAY_MODES)
    check_choice("eval.protocol", config.eval.protocol, choices.PROTOCOLS)
    check_choice("train.dtype", t.dtype, choices.DTYPES)
    models.resolve_arch(config.model.arch)
    check_choice("model.init_scheme", config.model.init_scheme, choices.INIT_SCHEMES)
    check_choice("model.bias_init", config.model.get("bias_init", "zeros"), choices.BIAS_INITS)
    check_choice("model.conv_impl", config.model.conv_impl, choices.CONV_IMPLS)
    if config.model.get("box_head", "") not in choices.BOX_HEADS:
        raise UserError(f"model.box_head={config.model.box_head!r}: valid are '' (a "
                        f"classifier), 'scr' (one box for all classes) and 'pcr' (a box per "
                        f"class)")
    if config.model.get("box_head") and config.eval.protocol != "center":
        raise UserError(f"eval.protocol={config.eval.protocol!r}: a box net (model.box_head="
                        f"{config.model.box_head!r}) validates with the paper's centre-crop "
                        f"protocol (eval.protocol='center', the box of the true class)")


# ----------------------------------------------------------------------------- overrides

def flat_keys(config) -> list[str]:
    """Every field of a ConfigDict as a dotted path ('optim.learning_rate')."""
    out = []
    for key, value in config.items():
        if hasattr(value, "items"):
            out += [f"{key}.{k}" for k in flat_keys(value)]
        else:
            out.append(key)
    return out


def override_keys(argv) -> list[str]:
    """The keys of --config.KEY=VALUE (or --config.KEY VALUE) arguments."""
    return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def config_path(argv, default: str) -> str:
    """The config file argv names (--config=PATH[:ARG] or --config PATH), or `default`."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def explain_flag_error(argv, error: Exception, default_config: str, names=()) -> str:
    """One line for a command line that absl / ml_collections could not parse: an unknown
    config key with the closest valid ones, a missing config file (with the packaged
    configs' `names`), or the parser's own first line (a value of the wrong type)."""
    path = config_path(argv, default_config)
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
        known = f"a packaged config ({', '.join(names)}) or " if names else ""
        return f"config file {file} not found (give --config {known}a config file's path)"
    import importlib.util
    try:  # the error may be the config file's own: report it, do not raise it again
        spec = importlib.util.spec_from_file_location("_vgg_jax_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(path.split(":", 1)[1]) if ":" in path else module.get_config()
    except Exception as e:  # noqa: BLE001 (anything the user's file raises)
        import traceback
        # the line in the file named, or in the packaged config a repository file points at
        packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "")
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if os.path.abspath(f.filename) == os.path.abspath(file)
                  or os.path.abspath(f.filename).startswith(packaged)]
        where = ""
        if frames:
            f = frames[-1]
            shown = ("" if os.path.abspath(f.filename) == os.path.abspath(file) else
                     "vgg_jax/configs/" + os.path.basename(f.filename) + " ")
            where = f" ({shown}line {f.lineno})"
        arg = f" with argument {path.split(':', 1)[1]!r}" if ":" in path else ""
        first = (str(e).splitlines() or [""])[0]
        return (f"config file {file}{arg} failed{where}: {type(e).__name__}: {first}")
    keys = flat_keys(config)
    for key in override_keys(argv):
        if key in keys:
            continue
        section, _, field = key.rpartition(".")
        fields = [k[len(section) + 1:] for k in keys if k.startswith(section + ".")]
        if not section or not fields:  # the section itself is wrong
            sections = sorted({k.split(".")[0] for k in keys})
            near = closest(key.split(".")[0], sections)
            hint = f"did you mean {near[0]!r}? " if near else ""
            return (f"unknown config key {key!r}: {hint}the sections are "
                    f"{', '.join(sections)}")
        near = closest(field, fields, n=1)
        if near:
            return f"unknown config key {key!r}: did you mean {section}.{near[0]}?"
        return f"unknown config key {key!r}: {section} has {', '.join(fields)}"
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    return lines[0] if lines else type(error).__name__
