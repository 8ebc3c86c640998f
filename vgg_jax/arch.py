"""The VGG configurations of Table 1 as data: the architectures' names, their layers
with the paper's names (`conv{block}_{i}`, `lrn1`, `pool{block}`), and the taps a loss
network reads (`reluX_Y`, `convX_Y_pre`) with torchvision's `features` index of each.
`vgg_jax.models` builds the nets from these tables (and re-exports them)."""
from __future__ import annotations

import dataclasses
import re

from vgg_jax.errors import UserError

# Table 1, one row per block; every block ends in a 2x2/2 max-pool.
CONFIGS: dict[str, tuple[tuple[str, ...], ...]] = {
    "A": (("conv3-64",), ("conv3-128",), ("conv3-256",) * 2, ("conv3-512",) * 2, ("conv3-512",) * 2),
    "A-LRN": (("conv3-64", "LRN"), ("conv3-128",), ("conv3-256",) * 2, ("conv3-512",) * 2,
              ("conv3-512",) * 2),
    "B": (("conv3-64",) * 2, ("conv3-128",) * 2, ("conv3-256",) * 2, ("conv3-512",) * 2,
          ("conv3-512",) * 2),
    "C": (("conv3-64",) * 2, ("conv3-128",) * 2, ("conv3-256",) * 2 + ("conv1-256",),
          ("conv3-512",) * 2 + ("conv1-512",), ("conv3-512",) * 2 + ("conv1-512",)),
    "D": (("conv3-64",) * 2, ("conv3-128",) * 2, ("conv3-256",) * 3, ("conv3-512",) * 3,
          ("conv3-512",) * 3),
    "E": (("conv3-64",) * 2, ("conv3-128",) * 2, ("conv3-256",) * 4, ("conv3-512",) * 4,
          ("conv3-512",) * 4),
    # Sec. 4.1's shallow net: B with each pair of 3x3 convs replaced by one 5x5 conv
    # (the same receptive field; the paper reports 7% higher top-1 error than B).
    "B-5x5": (("conv5-64",), ("conv5-128",), ("conv5-256",), ("conv5-512",), ("conv5-512",)),
}
# Paper letter <-> the names people know from torchvision (C and A-LRN have none there).
ALIASES = {"A": "vgg11", "A-LRN": "vgg11_lrn", "B": "vgg13", "C": "vgg16_c", "D": "vgg16",
           "E": "vgg19", "B-5x5": "vgg13_5x5"}
_LETTERS = {k.upper(): k for k in CONFIGS}
_BY_NAME = {v: k for k, v in ALIASES.items()}

# Krizhevsky et al. 2012, Sec. 3.3 (used by A-LRN): n=5, k=2, alpha=1e-4, beta=0.75.
LRN_PARAMS = dict(size=5, k=2.0, alpha=1e-4, beta=0.75)
POOLS = 5  # five 2x2 stride-2 max-pools: inputs need at least 2**5 pixels a side.
MIN_SIZE = 2 ** POOLS  # the smallest image side a VGG takes


def all_arch_names() -> list[str]:
    names = []
    for letter, alias in ALIASES.items():
        names += [letter, f"{letter}_bn", alias, f"{alias}_bn"]
    return names


def resolve_arch(arch: str) -> tuple[str, bool]:
    """'vgg16_bn' / 'D_bn' / 'D' / 'vgg11_lrn' -> (paper letter, batch_norm)."""
    name = arch.strip()
    batch_norm = False
    for suffix in ("_bn", "-bn", "_BN", "-BN"):
        if name.endswith(suffix):
            name, batch_norm = name[: -len(suffix)], True
            break
    if name.upper() in _LETTERS:
        return _LETTERS[name.upper()], batch_norm
    if name.lower() in _BY_NAME:
        return _BY_NAME[name.lower()], batch_norm
    raise UserError(f"unknown architecture {arch!r}; valid names: {', '.join(all_arch_names())}")


def canonical_name(arch: str) -> str:
    letter, bn = resolve_arch(arch)
    return ALIASES[letter] + ("_bn" if bn else "")


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str   # paper name: conv3_2, lrn1, pool3
    kind: str   # 'conv' | 'lrn' | 'pool'
    kernel: int = 0
    channels: int = 0  # full-width output channels (before the width multiplier)


def layer_table(arch: str) -> list[Layer]:
    """The feature layers of `arch` in order, with paper names."""
    letter, _ = resolve_arch(arch)
    layers = []
    for b, block in enumerate(CONFIGS[letter], start=1):
        i = 0
        for item in block:
            if item == "LRN":
                layers.append(Layer(f"lrn{b}", "lrn"))
                continue
            m = re.fullmatch(r"conv(\d)-(\d+)", item)
            i += 1
            layers.append(Layer(f"conv{b}_{i}", "conv", int(m.group(1)), int(m.group(2))))
        layers.append(Layer(f"pool{b}", "pool", 2))
    return layers


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def bn_name(conv_name: str) -> str:
    """The BatchNorm layer that follows a conv layer: conv3_1 -> bn3_1."""
    return "bn" + conv_name[len("conv"):]


def check_layer(arch: str, layer: str) -> None:
    """A clear error for a layer name `arch` does not have (capture, embed, plots)."""
    if layer not in tap_names(arch):
        raise UserError(f"unknown layer {layer!r} for {arch}; valid: "
                         f"{', '.join(layer_names(arch))}")


def layer_names(arch: str) -> list[str]:
    """The layers of this architecture, in order: convs, LRN, pools, fc6-fc8."""
    return [l.name for l in layer_table(arch)] + ["fc6", "fc7", "fc8"]


def relu_name(conv_name: str) -> str:
    """The ReLU after a conv layer, as the loss-network literature names it: conv3_3 ->
    relu3_3 (the tensor `conv3_3` names too)."""
    return "relu" + conv_name[len("conv"):]


def torchvision_index(arch: str) -> dict[str, int]:
    """{tap: the index in torchvision's `vgg.features` whose output it is}: conv1_2_pre =
    features.2, relu1_2 = conv1_2 = features.3, pool1 = features.4 for vgg16 (vgg16_bn:
    conv1_2_pre = features.3, relu1_2 = features.5). For torchvision's four: A, B, D, E."""
    letter, bn = resolve_arch(arch)
    if letter not in ("A", "B", "D", "E"):
        raise UserError(f"torchvision has no {canonical_name(arch)} (only vgg11, vgg13, vgg16, "
                        f"vgg19 and their _bn)")
    out, i = {}, 0
    for l in layer_table(arch):
        if l.kind == "conv":
            out[l.name + "_pre"] = i
            i += 2 if bn else 1
            out[l.name] = out[relu_name(l.name)] = i
        else:
            out[l.name] = i
        i += 1
    return out


def tap_names(arch: str) -> list[str]:
    """Every name `capture=` (and `extract`) accepts: each layer of `layer_names`, and per
    conv layer `reluX_Y` (after its ReLU: the same tensor as `convX_Y`) and `convX_Y_pre`
    (the conv's output, before BatchNorm and ReLU)."""
    names = []
    for l in layer_table(arch):
        names += [l.name, relu_name(l.name), l.name + "_pre"] if l.kind == "conv" else [l.name]
    return names + ["fc6", "fc7", "fc8"]
