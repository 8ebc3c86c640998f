"""Per-layer accounting of a VGG: output shape, params, FLOPs, activation bytes and
receptive field, computed from the layer table (and checked against the real module's
parameter tree, built abstractly with jax.eval_shape)."""
from __future__ import annotations

import json

from vgg_jax import models


def receptive_fields(arch: str) -> dict[str, int]:
    """RF_n = RF_{n-1} + (k_n - 1) * S_{n-1}, S the product of earlier strides."""
    rf, stride, out = 1, 1, {}
    for layer in models.layer_table(arch):
        if layer.kind == "conv":
            rf += (layer.kernel - 1) * stride
        elif layer.kind == "pool":
            rf += (2 - 1) * stride
            stride *= 2
        out[layer.name] = rf
    return out


def summarize(arch: str, *, num_classes: int = 1000, image_size: int = 224,
              in_channels: int = 3, width: float = 1.0, fc_widths=(4096, 4096),
              classifier_pool: int = 7, bytes_per_value: int = 4) -> dict:
    """One dict per layer plus totals. FLOPs count a multiply-add as 2 (`macs` is the
    number torchvision calls GFLOPS). Activation bytes: every layer's output for one
    image, plus the input, at `bytes_per_value` (ReLU in place, as in the usual count)."""
    model = models.create_model(arch, num_classes=num_classes, in_channels=in_channels,
                                width=width, fc_widths=fc_widths,
                                classifier_pool=classifier_pool)
    models.check_input((1, image_size, image_size, in_channels), in_channels)
    _, batch_norm = models.resolve_arch(arch)
    rfs = receptive_fields(arch)
    h = w = image_size
    c = in_channels
    rows = []

    def add(name, shape, params, macs, rf=None):
        n = 1
        for s in shape:
            n *= s
        rows.append(dict(name=name, shape=list(shape), params=params, macs=macs,
                         flops=2 * macs, activation_bytes=n * bytes_per_value,
                         receptive_field=rf))

    add("input", (h, w, c), 0, 0, 1)
    for layer in models.layer_table(arch):
        if layer.kind == "conv":
            cout = models.scaled(layer.channels, width)
            k = layer.kernel
            params = k * k * c * cout + cout + (2 * cout if batch_norm else 0)
            add(layer.name, (h, w, cout), params, h * w * k * k * c * cout, rfs[layer.name])
            c = cout
        elif layer.kind == "lrn":
            add(layer.name, (h, w, c), 0, 0, rfs[layer.name])
        else:
            h, w = h // 2, w // 2
            add(layer.name, (h, w, c), 0, 0, rfs[layer.name])
    p = classifier_pool
    if (h, w) != (p, p):
        add("avgpool", (p, p, c), 0, 0)
    fan_in = p * p * c
    for name, f in zip(("fc6", "fc7", "fc8"), (*fc_widths, num_classes)):
        add(name, (f,), fan_in * f + f, fan_in * f)
        fan_in = f

    total_params = sum(r["params"] for r in rows)
    real = models.count_params(models.abstract_variables(model, image_size)["params"])
    if total_params != real:  # the table must describe the module (not an `assert`: -O)
        raise RuntimeError(f"summary counts {total_params} parameters for {arch} but the "
                           f"module has {real}: a bug in vgg_jax.summary, please report it")
    return dict(arch=models.canonical_name(arch), image_size=image_size,
                num_classes=num_classes, width=width, params=total_params,
                macs=sum(r["macs"] for r in rows), flops=sum(r["flops"] for r in rows),
                activation_bytes=sum(r["activation_bytes"] for r in rows), layers=rows)


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_table(s: dict) -> str:
    head = f"{'layer':<9} {'output (HxWxC)':>16} {'params':>13} {'FLOPs':>10} {'act bytes':>10} {'RF':>5}"
    lines = [f"{s['arch']} at {s['image_size']}x{s['image_size']}, {s['num_classes']} classes, "
             f"width {s['width']:g}", head, "-" * len(head)]
    for r in s["layers"]:
        shape = "x".join(str(d) for d in r["shape"])
        rf = "" if r["receptive_field"] is None else str(r["receptive_field"])
        lines.append(f"{r['name']:<9} {shape:>16} {r['params']:>13,} {_human(r['flops']):>10} "
                     f"{_human(r['activation_bytes'], 'B'):>10} {rf:>5}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<9} {'':>16} {s['params']:>13,} {_human(s['flops']):>10} "
                 f"{_human(s['activation_bytes'], 'B'):>10}")
    lines.append(f"multiply-adds: {_human(s['macs'])} (torchvision's 'GFLOPS'); FLOPs = 2 x MACs; "
                 "activation bytes: forward, one image, float32")
    return "\n".join(lines)


def main(*, arch: str, num_classes: int = 1000, image_size: int = 224, in_channels: int = 3,
         width: float = 1.0, json_output: bool = False) -> None:
    s = summarize(arch, num_classes=num_classes, image_size=image_size,
                  in_channels=in_channels, width=width)
    print(json.dumps(s) if json_output else format_table(s))
