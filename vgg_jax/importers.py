"""Weights from other frameworks: Keras' VGG16/VGG19 files (the paper's released Caffe
weights as most people have them) and ONNX graphs of (fine-tuned) VGGs.

Both are read without the framework that wrote them (h5py, onnx) and mapped onto a
vgg_jax model in layer order: the i-th convolution of the file is the i-th conv layer of
Table 1, the dense / Gemm layers are fc6, fc7, fc8. Every shape is checked against the
architecture and the first that does not fit is named with both shapes.
`include_top=False` reads the convolutions only (any head is ignored): the backbone of a
fine-tuned model, for `extract` or fine-tuning with a new head (`train.init_from`).
"""
from __future__ import annotations

import io
import json
import os
import re
import zipfile

import numpy as np

from vgg_jax import models
from vgg_jax.errors import MissingDependency, NotFound, UserError

KERAS_BLOCK = re.compile(r"block(\d+)_conv(\d+)$")
KERAS_FC = {"fc1": "fc6", "fc2": "fc7", "predictions": "fc8"}


# ----------------------------------------------------------------------------- mapping

def fc6_torch_to_flax(w: np.ndarray, pool: int) -> np.ndarray:
    """(out, C*H*W) torch rows -> (H*W*C, out) Flax kernel."""
    out, fin = w.shape
    c = fin // (pool * pool)
    return w.reshape(out, c, pool, pool).transpose(2, 3, 1, 0).reshape(pool * pool * c, out)


def fc6_flax_to_torch(k: np.ndarray, pool: int) -> np.ndarray:
    fin, out = k.shape
    c = fin // (pool * pool)
    return k.reshape(pool, pool, c, out).transpose(3, 2, 0, 1).reshape(out, c * pool * pool)



def _assign(arch: str, convs, fcs, include_top: bool, source: str, fc6_order=None,
            batch_norms=None):
    """Flax variables and model kwargs from ordered (name, kernel HWIO, bias) convs and
    (name, kernel (in, out), bias) fcs. `fc6_order(kernel, pool)` maps fc6's rows to
    (H, W, C) order when the file flattened otherwise; `batch_norms` (name, scale, bias,
    mean, var) per conv for _bn architectures."""
    letter, bn = models.resolve_arch(arch)
    table = [l for l in models.layer_table(letter) if l.kind == "conv"]
    if not convs:
        raise UserError(f"{source}: no convolution weights found; is it a VGG?")
    in_channels, width = convs[0][1].shape[2], convs[0][1].shape[3] / 64.0
    params, stats = {}, {}
    cin = in_channels
    for layer, (name, kernel, bias) in zip(table, convs):
        want = (layer.kernel, layer.kernel, cin, models.scaled(layer.channels, width))
        if tuple(kernel.shape) != want or bias.shape != (want[-1],):
            raise UserError(f"{source}: {name!r} has kernel {tuple(kernel.shape)}, bias "
                            f"{tuple(bias.shape)}, but {models.canonical_name(arch)}'s "
                            f"{layer.name} needs {want}, ({want[-1]},)")
        params[layer.name] = {"kernel": kernel, "bias": bias}
        cin = want[-1]
    if len(convs) > len(table):
        raise UserError(f"{source}: layer {convs[len(table)][0]!r} has no place in "
                        f"{models.canonical_name(arch)}, which has {len(table)} conv layers "
                        f"(weights of a deeper VGG?)")
    if len(convs) < len(table):
        raise UserError(f"{source}: {len(convs)} conv layers, but "
                        f"{models.canonical_name(arch)} needs {len(table)}: its "
                        f"{table[len(convs)].name} has no weights (weights of a shallower VGG?)")
    if bn:
        if batch_norms is None or len(batch_norms) != len(table):
            raise UserError(f"{source}: {models.canonical_name(arch)} has BatchNorm after "
                            f"every conv, the file has "
                            f"{0 if batch_norms is None else len(batch_norms)}; convert it "
                            f"as {models.canonical_name(letter)}")
        for layer, (name, scale, beta, mean, var) in zip(table, batch_norms):
            want = (params[layer.name]["bias"].shape[0],)
            for what, a in (("scale", scale), ("bias", beta), ("mean", mean), ("var", var)):
                if a is None or tuple(np.shape(a)) != want:
                    raise UserError(
                        f"{source}: BatchNormalization {name!r} has {what} "
                        f"{None if a is None else tuple(np.shape(a))}, but "
                        f"{models.canonical_name(arch)}'s {models.bn_name(layer.name)} needs "
                        f"{want}")
            params[models.bn_name(layer.name)] = {"scale": scale, "bias": beta}
            stats[models.bn_name(layer.name)] = {"mean": mean, "var": var}
    kwargs = dict(arch=models.canonical_name(arch), in_channels=int(in_channels),
                  width=float(width), include_top=include_top)
    if include_top:
        if len(fcs) != 3:
            names = ", ".join(n for n, _, _ in fcs) or "none"
            raise UserError(f"{source}: the head has {len(fcs)} dense layers ({names}), not "
                            f"VGG's fc6, fc7, fc8: convert with include_top=False (--no-top) "
                            f"to take the convolutions only")
        c5 = cin
        fin = fcs[0][1].shape[0]
        pool = int(round(np.sqrt(fin / c5)))
        if pool * pool * c5 != fin:
            raise UserError(f"{source}: {fcs[0][0]!r} takes {fin} inputs, which is not "
                            f"k x k x {c5} pool5 features")
        prev = fin
        for (name, kernel, bias), ours in zip(fcs, ("fc6", "fc7", "fc8")):
            if kernel.shape[0] != prev or bias.shape != (kernel.shape[1],):
                raise UserError(f"{source}: {name!r} has kernel {tuple(kernel.shape)}, but "
                                f"{ours} takes {prev} inputs")
            if ours == "fc6" and fc6_order is not None:
                kernel = fc6_order(kernel, pool)
            params[ours] = {"kernel": kernel, "bias": bias}
            prev = kernel.shape[1]
        kwargs.update(fc_widths=[int(fcs[0][1].shape[1]), int(fcs[1][1].shape[1])],
                      num_classes=int(fcs[2][1].shape[1]), classifier_pool=pool)
    return as_variables(params, stats), kwargs


def as_variables(params: dict, stats: dict | None = None) -> dict:
    """{'params'[, 'batch_stats']} of {layer: {leaf: array}} trees, every leaf a contiguous
    float32 array (what every converter returns)."""
    cast = lambda t: {k: {kk: np.ascontiguousarray(vv, np.float32) for kk, vv in v.items()}
                      for k, v in t.items()}
    variables = {"params": cast(params)}
    if stats:
        variables["batch_stats"] = cast(stats)
    return variables


# ----------------------------------------------------------------------------- Keras

def _open_keras(path: str):
    """(h5py.File, layer order from the saved config or None) of .h5 / .weights.h5 /
    .keras files."""
    import h5py
    if not os.path.exists(path):
        raise NotFound(f"Keras file {path} does not exist")
    try:
        if zipfile.is_zipfile(path):  # .keras: config.json + model.weights.h5
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
                weights = io.BytesIO(z.read("model.weights.h5"))
            layers = [(l["class_name"], l["config"]["name"]) for l in config["config"]["layers"]]
            return h5py.File(weights, "r"), layers
        return h5py.File(path, "r"), None
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} as a Keras file (.h5 or .keras): "
                        f"{str(e).splitlines()[0]}") from None


def _datasets(group):
    import h5py
    out = []
    group.visititems(lambda name, obj: out.append((name, np.asarray(obj)))
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def _kernel_bias(arrays, name, source):
    kernels = [a for _, a in arrays if a.ndim >= 2]
    biases = [a for _, a in arrays if a.ndim == 1]
    if len(kernels) != 1 or len(biases) != 1:
        raise UserError(f"{source}: layer {name!r} holds {len(arrays)} arrays, not a kernel "
                        f"and a bias")
    return name, kernels[0], biases[0]


def read_keras(path: str):
    """(convs, fcs) in order: [(keras layer name, kernel, bias)] from Keras' files: the
    legacy HDF5 of `model.save('x.h5')` and the released `vgg16_weights_tf_dim_ordering_
    tf_kernels*.h5` (layers by name: block{b}_conv{i}, fc1, fc2, predictions), and Keras 3's
    `.keras` / `.weights.h5` (layers/conv2d[_k]/vars, in model order)."""
    f, config_layers = _open_keras(path)
    with f:
        if "layers" in f and "model_weights" not in f:  # Keras 3 weights format
            groups = {n: _datasets(f["layers"][n]) for n in f["layers"]}
            by_type = {"conv2d": [], "dense": []}
            for n, arrays in groups.items():
                m = re.fullmatch(r"(conv2d|dense)(?:_(\d+))?", n)
                if m is None:
                    if arrays:
                        raise UserError(f"{path}: layer {n!r} with weights is not a Conv2D or "
                                        f"Dense layer of a VGG")
                    continue
                by_type[m.group(1)].append((int(m.group(2) or 0), n, arrays))
            names = {"Conv2D": [], "Dense": []}
            for cls, name in config_layers or []:
                if cls in names:
                    names[cls].append(name)
            out = []
            for kind, cls in (("conv2d", "Conv2D"), ("dense", "Dense")):
                ordered = sorted(by_type[kind])
                shown = names[cls] if len(names[cls]) == len(ordered) else [n for _, n, _ in ordered]
                out.append([_kernel_bias([(k, a) for k, a in sorted(arrays)], name, path)
                            for (_, _, arrays), name in zip(ordered, shown)])
            return out[0], out[1]
        root = f["model_weights"] if "model_weights" in f else f
        convs, fcs = [], []
        for n in root:
            arrays = _datasets(root[n])
            if not arrays:
                continue  # input, pooling, flatten
            m = KERAS_BLOCK.fullmatch(n)
            if m:
                convs.append(((int(m.group(1)), int(m.group(2))), _kernel_bias(arrays, n, path)))
            elif n in KERAS_FC:
                fcs.append((list(KERAS_FC).index(n), _kernel_bias(arrays, n, path)))
            else:
                raise UserError(f"{path}: layer {n!r} is not one of Keras' VGG layers "
                                f"(block{{b}}_conv{{i}}, fc1, fc2, predictions)")
        return [c for _, c in sorted(convs)], [c for _, c in sorted(fcs)]


def from_keras(path: str, arch: str, include_top: bool = True):
    """(variables, model kwargs) from a Keras VGG16 / VGG19 file. Kernels are HWIO as
    ours and Keras flattens pool5 in (H, W, C) order as vgg_jax does, so nothing is
    permuted. The weights expect Caffe's preprocessing (BGR, mean subtracted, 0-255)."""
    convs, fcs = read_keras(path)
    return _assign(arch, convs, fcs if include_top else [], include_top, path)


# ----------------------------------------------------------------------------- ONNX

def read_onnx(path: str):
    """(convs, batch_norms, fcs, fc6 flattened from NCHW?) of an ONNX graph, in node
    order; Conv / BatchNormalization / Gemm / MatMul weights come from the initializers
    (through Transpose / Identity nodes where the exporter put them)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingDependency(f"reading {path} needs the onnx package (pip install "
                                f"'vgg_jax[onnx]')") from None
    if not os.path.exists(path):
        raise NotFound(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(path)
    except Exception as e:  # DecodeError and friends for a truncated or foreign file
        raise UserError(f"cannot read {path} as an ONNX model: {str(e).splitlines()[0]}") from None
    graph = model.graph
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # Constant nodes hold weights too in some exports
        if node.op_type == "Constant" and node.attribute:
            const[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def value(name):
        """An initializer, followed through Identity / Transpose / Cast nodes."""
        if name in const:
            return const[name]
        producer = next((n for n in graph.node if name in n.output), None)
        if producer is not None and producer.op_type in ("Identity", "Transpose", "Cast"):
            x = value(producer.input[0])
            if x is not None and producer.op_type == "Transpose":
                perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"),
                            None)
                x = np.transpose(x, perm)
            return x
        return None

    convs, norms, fcs = [], [], []
    nhwc_flatten = False
    for node in graph.node:
        if node.op_type == "Conv":
            w = value(node.input[1])
            b = value(node.input[2]) if len(node.input) > 2 else None
            if w is None:
                raise UserError(f"{path}: Conv node {node.name!r} has no constant weight")
            _check_vgg_conv(path, node, w.shape[2:])
            if b is None:
                b = np.zeros(w.shape[0], w.dtype)
            convs.append((node.input[1], w.transpose(2, 3, 1, 0), b))  # OIHW -> HWIO
        elif node.op_type == "BatchNormalization":
            scale, beta, mean, var = (value(i) for i in node.input[1:5])
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            # our BN divides by sqrt(var + 1e-5): fold a different epsilon into var
            norms.append((node.input[1], scale, beta, mean, var + (eps - 1e-5)))
        elif node.op_type == "Transpose" and convs and not fcs:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm == [0, 2, 3, 1] and value(node.input[0]) is None:
                nhwc_flatten = True  # activations go NHWC before the flatten
        elif node.op_type in ("Gemm", "MatMul"):
            a_const, b_const = value(node.input[0]), value(node.input[1])
            if b_const is None or a_const is not None:
                raise UserError(f"{path}: {node.op_type} node {node.name!r} has no constant "
                                f"weight matrix")
            if node.op_type == "Gemm":
                _check_plain_gemm(path, node)
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            kernel = b_const.T if trans_b else b_const  # -> (in, out)
            bias = None
            if node.op_type == "Gemm" and len(node.input) > 2:
                bias = value(node.input[2])
            else:  # MatMul followed by Add(bias)
                nxt = next((n for n in graph.node if node.output[0] in n.input), None)
                if nxt is not None and nxt.op_type == "Add":
                    bias = next((value(i) for i in nxt.input if value(i) is not None), None)
            if bias is None:
                bias = np.zeros(kernel.shape[1], kernel.dtype)
            fcs.append((node.input[1], kernel, bias.reshape(-1)))
    return convs, norms, fcs, not nhwc_flatten


def _attributes(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_vgg_conv(path: str, node, kernel_hw) -> None:
    """A VGG conv: stride 1, 'same' zero padding (1 for 3x3, 0 for 1x1), no dilation, one
    group. Anything else computes another function with the same weight shapes."""
    a = _attributes(node)
    k = tuple(int(x) for x in kernel_hw)
    pad = (k[0] - 1) // 2
    wrong = []
    if list(a.get("strides", [1, 1])) != [1, 1]:
        wrong.append(f"strides {list(a['strides'])}")
    if list(a.get("dilations", [1, 1])) != [1, 1]:
        wrong.append(f"dilations {list(a['dilations'])}")
    if int(a.get("group", 1)) != 1:
        wrong.append(f"group {a['group']}")
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if k not in ((3, 3), (1, 1)):
        wrong = [f"a {k[0]}x{k[1]} kernel"]
    elif auto_pad in ("NOTSET", ""):
        if list(a.get("pads", [0, 0, 0, 0])) != [pad] * 4:
            wrong.append(f"pads {list(a.get('pads', [0, 0, 0, 0]))}")
    elif not (auto_pad in ("SAME_UPPER", "SAME_LOWER") or (auto_pad == "VALID" and pad == 0)):
        wrong.append(f"auto_pad {auto_pad}")
    if wrong:
        raise UserError(f"{path}: Conv node {node.name!r} has {', '.join(wrong)}: not a VGG "
                        f"conv (3x3 or 1x1, stride 1, 'same' padding, no dilation, one group)")


def _check_plain_gemm(path: str, node) -> None:
    """A fully connected layer: Y = X W^T + b or X W + b (alpha = beta = 1, A not
    transposed)."""
    a = _attributes(node)
    wrong = [f"{name} {a[name]}" for name, want in (("alpha", 1.0), ("beta", 1.0), ("transA", 0))
             if name in a and a[name] != want]
    if wrong:
        raise UserError(f"{path}: Gemm node {node.name!r} has {', '.join(wrong)}: not a fully "
                        f"connected layer (alpha 1, beta 1, transA 0)")


def from_onnx(path: str, arch: str, include_top: bool = True):
    """(variables, model kwargs) from an ONNX VGG graph (torchvision's export, BN
    included; fc6 flattened from NCHW unless the graph transposes to NHWC first)."""
    convs, norms, fcs, nchw = read_onnx(path)
    _, bn = models.resolve_arch(arch)
    if norms and not bn:  # dropping them would compute another function
        raise UserError(f"{path}: the graph has {len(norms)} BatchNormalization nodes, "
                        f"which {models.canonical_name(arch)} has no place for; convert it "
                        f"as {models.canonical_name(arch)}_bn")
    if bn and not norms and convs:  # BN folded into the convs at export: an identity BN
        c = lambda w: np.ones(w.shape[-1], np.float32)
        norms = [(name, c(w), 0 * c(w), 0 * c(w), c(w) - 1e-5) for name, w, _ in convs]
    torch_rows = (lambda k, pool: fc6_torch_to_flax(k.T, pool)) if nchw else None
    return _assign(arch, convs, fcs if include_top else [], include_top, path,
                   fc6_order=torch_rows, batch_norms=norms if bn else None)
