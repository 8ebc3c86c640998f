"""torchvision VGG state_dicts <-> Flax variables, mapped by name, never by position;
Keras and ONNX files in (`from_keras`, `from_onnx`: vgg_jax/importers.py).

torchvision: `features.{i}` = Conv2d[, BatchNorm2d], ReLU, ..., MaxPool2d in Table-1 order
(LRN, for A-LRN, takes an index too); `classifier.{0,3,6}` = fc6, fc7, fc8.
conv OIHW -> HWIO; linear (out, in) -> (in, out); fc6's rows go from torch's (C, H, W)
flatten order to NHWC's (H, W, C) once, here, so the model never transposes activations.
"""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np

from vgg_jax import classes, importers, models
from vgg_jax.importers import fc6_flax_to_torch, fc6_torch_to_flax  # noqa: F401 (API)
from vgg_jax.errors import MissingDependency, NotFound, UserError

BN_TORCH = {"weight": "scale", "bias": "bias"}
BN_STATS = {"running_mean": "mean", "running_var": "var"}


def torch_layout(arch: str) -> dict[str, tuple[str, str]]:
    """{flax layer name: (torch module prefix, kind)} in torchvision's order."""
    letter, bn = models.resolve_arch(arch)
    out, i = collections.OrderedDict(), 0
    for layer in models.layer_table(letter):
        if layer.kind == "conv":
            out[layer.name] = (f"features.{i}", "conv")
            i += 1
            if bn:
                out[models.bn_name(layer.name)] = (f"features.{i}", "bn")
                i += 1
            i += 1  # ReLU
        else:
            i += 1  # LRN / MaxPool2d
    for name, idx in (("fc6", 0), ("fc7", 3), ("fc8", 6)):
        out[name] = (f"classifier.{idx}", "fc")
    return out


# ----------------------------------------------------------------------------- reading

def load_state_dict(source) -> dict[str, np.ndarray]:
    """A state_dict from a dict, .pth/.pt (torch.load(weights_only=True): a pickle that
    would run code is refused), .safetensors or .npz (both torch-free)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise NotFound(f"weights file {path} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            sd = load_file(path)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                sd = {k: z[k] for k in z.files}
        else:
            try:
                import torch
            except ImportError:
                raise MissingDependency(f"reading {path} needs torch (pip install "
                                        f"'vgg_jax[torch]'); or convert it to .safetensors / "
                                        f".npz elsewhere") from None
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors
                raise UserError(f"refusing to load {path}: it is not a plain tensor state_dict "
                                 f"(torch.load(weights_only=True) said: "
                                 f"{str(e).splitlines()[0]})") from None
            except (RuntimeError, EOFError, OSError) as e:  # a truncated or foreign file
                raise UserError(f"cannot read {path} as a torch file (truncated or not "
                                 f"written by torch.save): {str(e).splitlines()[0]}") from None
    else:
        sd = source
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DataParallel
        # copy: .numpy() shares memory with the tensor, which torch may update in place
        out[k] = np.array(v.detach().cpu().numpy() if hasattr(v, "detach") else v, copy=True)
    return out


def infer_model_kwargs(sd, arch: str, num_classes: int | None = None,
                       include_top: bool = True) -> dict:
    """Model options read off the tensors: width, fc widths, classes, input channels.
    `num_classes`: the class count the caller expects (from_torch then refuses a file with
    another, naming the key and both shapes); None takes the file's."""
    layout = torch_layout(arch)
    first = layout["conv1_1"][0] + ".weight"
    if not include_top:
        if first not in sd:
            raise UserError(f"weights lack {first!r}, which {models.canonical_name(arch)} "
                            f"needs; found keys like {sorted(sd)[:4]}")
        return dict(arch=models.canonical_name(arch), in_channels=int(sd[first].shape[1]),
                    width=float(sd[first].shape[0]) / 64.0, include_top=False)
    fc6 = layout["fc6"][0] + ".weight"
    fc8 = layout["fc8"][0] + ".weight"
    for key in (first, fc6, fc8, layout["fc7"][0] + ".weight"):
        if key not in sd:
            raise UserError(f"weights lack {key!r}, which {models.canonical_name(arch)} needs; "
                             f"found keys like {sorted(sd)[:4]}")
    kw = dict(arch=models.canonical_name(arch), in_channels=int(sd[first].shape[1]),
              width=float(sd[first].shape[0]) / 64.0,
              fc_widths=[int(sd[fc6].shape[0]), int(sd[layout["fc7"][0] + ".weight"].shape[0])],
              num_classes=int(sd[fc8].shape[0]) if num_classes is None else int(num_classes),
              classifier_pool=7)
    return kw


def _check(sd, expected: dict[str, tuple], arch: str):
    """Every expected key present with its shape, nothing unexpected: else name the first
    bad key and both shapes."""
    for key, shape in expected.items():
        if key not in sd:
            raise UserError(f"{arch}: weights file has no {key!r} (expected shape {shape}); "
                             f"is it the file of another architecture?")
        if tuple(sd[key].shape) != tuple(shape):
            raise UserError(f"{arch}: {key!r} has shape {tuple(sd[key].shape)} in the weights "
                             f"file but the model expects {tuple(shape)}")
    extra = [k for k in sd if k not in expected and not k.endswith("num_batches_tracked")]
    if extra:
        raise UserError(f"{arch}: unexpected key {extra[0]!r} with shape {tuple(sd[extra[0]].shape)} "
                         f"in the weights file ({len(extra)} unexpected in all); is it the file "
                         f"of another architecture?")


def _torch_shapes(arch, abstract, pool):
    """The torch state_dict shapes a Flax variables tree corresponds to."""
    params = abstract["params"]
    out = {}
    for name, (prefix, kind) in torch_layout(arch).items():
        if name not in params:  # fc6-fc8 of a model without its head
            continue
        if kind == "conv":
            kh, kw, cin, cout = params[name]["kernel"].shape
            out[prefix + ".weight"], out[prefix + ".bias"] = (cout, cin, kh, kw), (cout,)
        elif kind == "bn":
            c = params[name]["scale"].shape[0]
            for t in ("weight", "bias", "running_mean", "running_var"):
                out[f"{prefix}.{t}"] = (c,)
        else:
            fin, fout = params[name]["kernel"].shape
            out[prefix + ".weight"], out[prefix + ".bias"] = (fout, fin), (fout,)
    return out


def from_torch(state_dict_or_path, arch: str, num_classes: int | None = None,
               include_top: bool = True):
    """Flax variables ({'params'[, 'batch_stats'][, 'torch_buffers']}) for
    `create_model(arch, **infer_model_kwargs(...))` from a torchvision-layout state_dict.
    `include_top=False`: the convolutions (`features.*`) only, whatever head the file has
    (for `create_model(arch, include_top=False)`)."""
    sd = load_state_dict(state_dict_or_path)
    if not include_top:
        sd = {k: v for k, v in sd.items() if k.startswith("features.")}
    kw = infer_model_kwargs(sd, arch, num_classes, include_top)
    model = models.create_model(**kw)
    abstract = models.abstract_variables(model, 224)
    _check(sd, _torch_shapes(arch, abstract, model.classifier_pool), kw["arch"])
    params, stats, buffers = {}, {}, {}
    for name, (prefix, kind) in torch_layout(arch).items():
        if kind == "fc" and not include_top:
            continue
        w = sd.get(prefix + ".weight")
        if kind == "conv":
            params[name] = {"kernel": w.transpose(2, 3, 1, 0), "bias": sd[prefix + ".bias"]}
        elif kind == "bn":
            params[name] = {v: sd[f"{prefix}.{k}"] for k, v in BN_TORCH.items()}
            stats[name] = {v: sd[f"{prefix}.{k}"] for k, v in BN_STATS.items()}
            if prefix + ".num_batches_tracked" in sd:
                buffers[name] = {"num_batches_tracked": np.asarray(
                    sd[prefix + ".num_batches_tracked"], np.int64)}
        else:
            kernel = fc6_torch_to_flax(w, model.classifier_pool) if name == "fc6" else w.T
            params[name] = {"kernel": kernel, "bias": sd[prefix + ".bias"]}
    variables = importers.as_variables(params, stats)
    if buffers:  # torch-only counters, kept so that torch -> Flax -> torch is bit-exact
        variables["torch_buffers"] = buffers
    return variables


def to_torch(variables, arch: str, *, as_numpy: bool = False, pool: int = 7):
    """A torchvision-layout state_dict (torch tensors, or NumPy arrays with as_numpy or
    without torch) from Flax variables."""
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    buffers = variables.get("torch_buffers", {})
    layout = torch_layout(arch)
    extra = sorted(set(params) - set(layout))
    if extra:  # e.g. vgg11_bn weights asked for as vgg11: the BN layers would be dropped
        raise UserError(f"{arch} has no layer(s) {', '.join(extra)}, which these variables "
                         f"hold: converting would drop them (are the weights another "
                         f"architecture?)")
    sd = collections.OrderedDict()
    for name, (prefix, kind) in layout.items():
        if name not in params:
            raise UserError(f"variables have no layer {name!r}, which {arch} needs")
        p = {k: np.asarray(v) for k, v in params[name].items()}
        if kind == "conv":
            sd[prefix + ".weight"] = p["kernel"].transpose(3, 2, 0, 1)
            sd[prefix + ".bias"] = p["bias"]
        elif kind == "bn":
            sd[prefix + ".weight"], sd[prefix + ".bias"] = p["scale"], p["bias"]
            sd[prefix + ".running_mean"] = np.asarray(stats[name]["mean"])
            sd[prefix + ".running_var"] = np.asarray(stats[name]["var"])
            sd[prefix + ".num_batches_tracked"] = np.asarray(
                buffers.get(name, {}).get("num_batches_tracked", 0), np.int64)
        else:
            sd[prefix + ".weight"] = (fc6_flax_to_torch(p["kernel"], pool) if name == "fc6"
                                      else p["kernel"].T)
            sd[prefix + ".bias"] = p["bias"]
    sd = collections.OrderedDict((k, np.array(v, order="C")) for k, v in sd.items())
    if as_numpy:
        return sd
    try:
        import torch
    except ImportError:
        return sd
    return collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())


def from_keras(path: str, arch: str, include_top: bool = True):
    """Flax variables from a Keras VGG16 / VGG19 file (.h5, .keras); see importers."""
    return importers.from_keras(path, arch, include_top)[0]


def from_onnx(path: str, arch: str, include_top: bool = True):
    """Flax variables from an ONNX VGG graph; see importers."""
    return importers.from_onnx(path, arch, include_top)[0]


def weights_meta(model_kwargs: dict, preprocessing: str = "torchvision") -> dict:
    """meta.json for converted weights: the model and the pixel convention they expect
    (torchvision: resize 256, centre crop 224, mean/std on [0, 1] pixels; caffe, for
    Keras' copies of the paper's weights: BGR, the mean subtracted, 0-255)."""
    from vgg_jax import preprocess
    n = model_kwargs.get("num_classes", 0)  # 0: a backbone without its head
    return dict(model=dict(model_kwargs),
                preprocessing=dict(preprocess.normalization(preprocessing), recipe="paper",
                                   image_size=224, eval_scale=256,
                                   channels=model_kwargs.get("in_channels", 3),
                                   convention=preprocessing, flip=True),
                class_names=classes.imagenet_names() if n == 1000 else [str(i) for i in range(n)])
