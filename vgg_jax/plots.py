"""Pictures of a trained VGG: embeddings in 2-D, a layer's feature maps, class saliency,
training curves. Each `plot_*` takes arrays and writes one PNG of exactly `size`
(width, height) pixels; each `main_*` is the CLI command that computes the arrays.

Drawing uses matplotlib's Agg backend (no screen needed); PCA and t-SNE are scikit-learn's.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from vgg_jax.choices import EMBED_METHODS
from vgg_jax.errors import NotFound, UserError, check_choice

DPI = 100
DEFAULT_SIZE = (1000, 800)


def parse_size(text: str) -> tuple[int, int]:
    """'800x600' -> (800, 600) pixels."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must be WIDTHxHEIGHT in pixels, like 1000x800; got {text!r}")
    if w < 200 or h < 150:
        raise UserError(f"--size {text} is too small to read; use at least 200x150")
    return w, h


def _figure(size):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def _save(fig, out: str):
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=DPI)  # no bbox_inches='tight': the PNG keeps the stated size
    plt.close(fig)
    return out


def display_image(image: np.ndarray, d) -> np.ndarray:
    """A preprocessed (normalised) HWC image back to [0, 1] RGB for showing; `d` has the
    normalisation fields of config.data (weights.data_config(meta))."""
    from vgg_jax import preprocess
    norm = preprocess.normalization(d.normalization, d.get("mean"), d.get("std"),
                                    d.get("bgr", False))
    x = np.asarray(image, np.float32)
    if norm["bgr"]:
        x = x[..., ::-1]
    x = x * np.asarray(norm["std"], np.float32) + np.asarray(norm["mean"], np.float32)
    x = np.clip(x / 255.0, 0.0, 1.0)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


# ----------------------------------------------------------------------------- embeddings

def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0):
    """(points (N, 2), axis labels) by PCA or t-SNE."""
    check_choice("projection method", method, EMBED_METHODS)
    x = np.asarray(embeddings, np.float64).reshape(len(embeddings), -1)
    if len(x) < 3:
        raise UserError(f"need at least 3 embeddings to project, got {len(x)}")
    if method == "pca":
        from sklearn.decomposition import PCA
        pca = PCA(n_components=2, random_state=seed)
        points = pca.fit_transform(x)
        var = 100 * pca.explained_variance_ratio_
        return points, (f"PC 1 ({var[0]:.1f}% of variance)", f"PC 2 ({var[1]:.1f}% of variance)")
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                      ).fit_transform(x)
        return points, ("t-SNE 1", "t-SNE 2")
    raise AssertionError(method)  # checked above


def plot_embeddings(embeddings, labels, class_names, out: str, *, method: str = "pca",
                    title: str = "", size=DEFAULT_SIZE, seed: int = 0):
    import matplotlib.pyplot as plt
    points, (xlabel, ylabel) = project_2d(embeddings, method, seed)
    labels = np.asarray(labels)
    fig = _figure(size)
    ax = fig.add_subplot()
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for k, c in enumerate(classes):
        sel = labels == c
        name = class_names[c] if c < len(class_names) else str(c)
        ax.scatter(points[sel, 0], points[sel, 1], s=10, alpha=0.75, color=cmap(k % cmap.N),
                   label=f"{name} ({sel.sum()})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{method.upper() if method == 'pca' else 't-SNE'} of "
                          f"{len(points)} embeddings")
    ax.legend(title="class (count)", loc="center left", bbox_to_anchor=(1.01, 0.5),
              fontsize="small", markerscale=2, ncols=1 if len(classes) <= 25 else 2)
    return _save(fig, out)


def main_plot_embeddings(*, embeddings: str, out: str, method: str = "pca",
                         size: str = "1000x800", seed: int = 0):
    if not os.path.isfile(embeddings):
        raise NotFound(f"embeddings file {embeddings} does not exist (write one with "
                       f"`vgg-jax embed ... --out FILE.npz`)")
    try:
        f = np.load(embeddings, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {embeddings} as an .npz of embeddings: "
                        f"{str(e).splitlines()[0]}") from None
    with f:
        if "embeddings" not in f or "labels" not in f:
            raise UserError(f"{embeddings} has no 'embeddings' and 'labels' arrays (it has "
                            f"{', '.join(f.files) or 'none'}): write it with `vgg-jax embed`")
        emb, labels = f["embeddings"], f["labels"]
        names = [str(n) for n in f["class_names"]] if "class_names" in f else []
        layer = str(f["layer"]) if "layer" in f else "embedding"
        data = str(f["data"]) if "data" in f else ""
    title = f"{layer} embeddings of {data} ({'PCA' if method == 'pca' else 't-SNE'}, " \
            f"{len(emb)} images)"
    out = plot_embeddings(emb, labels, names, out, method=method, title=title,
                          size=parse_size(size), seed=seed)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- activations

def strongest_channels(maps: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n channels with the largest mean activation, strongest first."""
    return np.argsort(-maps.reshape(-1, maps.shape[-1]).mean(0), kind="stable")[:n]


def plot_activations(image, maps, out: str, *, layer: str, max_maps: int = 64,
                     size=DEFAULT_SIZE, title: str = ""):
    """The input image beside a grid of the layer's strongest feature maps (H, W, C)."""
    maps = np.asarray(maps, np.float32)
    channels = strongest_channels(maps, max_maps)
    cols = math.ceil(math.sqrt(len(channels)))
    rows = math.ceil(len(channels) / cols)
    fig = _figure(size)
    left, right = fig.subfigures(1, 2, width_ratios=(1, 2))
    ax = left.add_subplot()
    ax.imshow(image)
    ax.set_title(f"input: {title}" if title else "input")
    ax.axis("off")
    right.suptitle(f"{layer}: {len(channels)} strongest of {maps.shape[-1]} feature maps "
                   f"({maps.shape[0]}x{maps.shape[1]})")
    axes = right.subplots(rows, cols, squeeze=False)
    for k, a in enumerate(axes.flat):
        a.axis("off")
        if k < len(channels):
            a.imshow(maps[..., channels[k]], cmap="viridis", interpolation="nearest")
            a.set_title(f"#{channels[k]}", fontsize=7, pad=1)
    return _save(fig, out)


def main_activations(*, weights: str, image: str, out: str, layer: str = "conv3_1",
                     max_maps: int = 64, size: str = "1400x700"):
    from vgg_jax import models
    from vgg_jax.weights import Net
    net = Net(weights)
    x = net.image(image)
    models.check_layer(net.model.arch, layer)
    maps = models.extract(net.model, net.variables, x[None], (layer,))[layer][0]
    if np.ndim(maps) != 3:
        raise UserError(f"{layer} is not a convolutional layer (output shape "
                        f"{np.shape(maps)}); pick a conv or pool layer, e.g. conv3_1")
    out = plot_activations(display_image(x, net.d), np.asarray(maps), out, layer=layer,
                           max_maps=max_maps, size=parse_size(size),
                           title=os.path.basename(image))
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- saliency

def plot_saliency(image, saliency, out: str, *, title: str = "", size=(1200, 450)):
    """Image | saliency map | overlay, side by side."""
    fig = _figure(size)
    axes = fig.subplots(1, 3)
    sal = np.asarray(saliency, np.float32)
    sal = sal / sal.max() if sal.max() > 0 else sal
    axes[0].imshow(image)
    axes[0].set_title("input")
    im = axes[1].imshow(sal, cmap="hot", vmin=0, vmax=1)
    axes[1].set_title("saliency: max$_c$ |dS/dI|")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="relative to the maximum")
    axes[2].imshow(image)
    axes[2].imshow(sal, cmap="hot", alpha=0.55, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for a in axes:
        a.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def main_saliency(*, weights: str, image: str, out: str, class_name: str | None = None,
                  size: str = "1200x450"):
    from vgg_jax import saliency
    from vgg_jax.weights import Net
    net = Net(weights)
    x = net.image(image)
    class_index = None
    if class_name is not None:
        if class_name not in net.class_names:
            raise UserError(f"unknown class {class_name!r}; the weights' classes are "
                            f"{', '.join(net.class_names[:20])}"
                            + (" ..." if len(net.class_names) > 20 else ""))
        class_index = net.class_names.index(class_name)
    sal, c, score = saliency.saliency_map(net.model, net.variables, x, class_index)
    p = float(np.asarray(net.probabilities(image))[c])
    title = (f"{os.path.basename(image)}: class saliency of '{net.class_names[c]}' "
             f"(score {score:.2f}, p={p:.3f})")
    out = plot_saliency(display_image(x, net.d), sal, out, title=title, size=parse_size(size))
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- metrics

def read_metrics(workdir: str) -> list[dict]:
    from vgg_jax import storage
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.isfile(path):
        raise NotFound(f"{path} not found: pass a training workdir (train.py "
                                f"--workdir) that has logged at least one step")
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{path} is empty: no step has been logged yet")
    return rows


def series(rows: list[dict], key: str):
    """(steps, values) of one metric; a resumed run's repeated steps keep the last value."""
    last = {r["step"]: r[key] for r in rows if key in r}
    steps = np.asarray(sorted(last), np.int64)
    return steps, np.asarray([last[s] for s in steps], np.float64)


def plot_metrics(rows: list[dict], out: str, *, title: str = "", size=(1200, 900)):
    """Loss, top-1/top-5 error and learning rate against step (train and eval)."""
    fig = _figure(size)
    ax_loss, ax_err, ax_lr = fig.subplots(3, 1, sharex=True)
    panels = [(ax_loss, [("train_loss", "train"), ("eval_loss", "eval")], "loss"),
              (ax_err, [("train_top1_err", "train top-1"), ("train_top5_err", "train top-5"),
                        ("eval_top1_err", "eval top-1"), ("eval_top5_err", "eval top-5")],
               "error"),
              (ax_lr, [("train_lr", "learning rate")], "learning rate")]
    for ax, keys, ylabel in panels:
        for key, label in keys:
            steps, values = series(rows, key)
            if len(steps):
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None,
                        markersize=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    ax_err.set_ylim(bottom=0)
    ax_lr.set_xlabel("step")
    fig.suptitle(title or "training curves")
    return _save(fig, out)


def main_plot_metrics(*, workdir: str, out: str, size: str = "1200x900"):
    rows = read_metrics(workdir)
    out = plot_metrics(rows, out, title=f"{os.path.abspath(workdir)}: training curves",
                       size=parse_size(size))
    print(f"wrote {out}")
