"""`vgg-jax evaluate --task localisation`: the paper's localisation measure (Appendix A)
for box nets on a dataset with boxes, with its two test protocols.

Centre crop (Table 8):
Each image's centre view (the same view `evaluate`'s 'center' protocol and training-time
validation take) goes through the box net. Without a classifier the box of the true class
is judged (Table 8: "only the box for the ground-truth class is considered", which factors
out classification). With `classifier` (a classification net's weights) its five best
classes on the same image are the five guesses, each with the box net's box for that class
(SCR: its one box), and the result is ILSVRC's top-1 and top-5 localisation error
(a guess is right when its class is the image's and its box overlaps one of the class's
boxes by IoU > 0.5), with the classifier's own error beside it.

Dense (Table 9's "fully-fledged" protocol): each box net runs fully-convolutionally over the
whole image rescaled to each test scale Q (Sec. 3.2), a box per position of its output map
(in fractions of the position's window, which `window_boxes` turns into fractions of the
image); the boxes of every net and scale are pooled (the paper's fusion: "the union of
their bounding box predictions") and merged greedily as OverFeat does (`boxes.merge`), each
prediction rated by the classification net's score of the class at its position. A class's
guess is its best merged box. With `classifier` the classes are its five best on the image
(its dense class scores averaged over positions, Sec. 3.2); without one the true class is
judged alone and each prediction counts one. `vgg-jax localize` runs the dense protocol on
image files and draws each image's five guesses (`localize`, `draw`).
"""
from __future__ import annotations

import jax
import numpy as np

from vgg_jax import (boxes, eval_data, input_pipeline, mesh, models, objectives,
                     preprocess)
from vgg_jax.errors import UserError

STRIDE = 2 ** models.POOLS  # pixels between neighbouring positions of a dense map
TOP = 5  # ILSVRC's guesses per image


def _box_net(net):
    if not net.model.box_head:
        raise UserError("--task localisation needs a box net's weights (a run of "
                        "digits_localisation, or any config with model.box_head='scr'|'pcr')")
    return net


def _same_classes(classifier, nets):
    for net in nets:
        if classifier is not None and classifier.model.num_classes != net.model.num_classes:
            raise UserError(f"the classifier has {classifier.model.num_classes} classes and "
                            f"the box net {net.model.num_classes}: they must name the same "
                            f"classes")


def _classes(classifier, source, batch_size, limit) -> list[np.ndarray]:
    """The classifier's five best classes of each image, batch by batch (N, 5)."""
    out = []
    for batch in eval_data.eval_batches(source, classifier.d,
                                        mesh.per_process_batch(batch_size), limit=limit):
        n = int(batch["mask"].sum())
        out.append(np.argsort(-classifier.posteriors(batch["image"]), axis=1)[:n, :5])
    return out


def evaluate_centre(box_net, data: str, split: str, *, classifier=None, data_dir=None,
                    batch_size: int = 64, limit: int | None = None) -> dict:
    """The centre-crop localisation result of `box_net` (a weights.Net with a box head)
    over a split with boxes; see the module doc."""
    _same_classes(classifier, [_box_net(box_net)])
    source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                        jax.process_count(), boxes=True)
    guesses = _classes(classifier, source, batch_size, limit) if classifier is not None else None
    sums = np.zeros(6)  # images, true-class box right, top-1 loc, top-5 loc, cls top-1, top-5
    for i, batch in enumerate(eval_data.eval_batches(source, box_net.d,
                                                     mesh.per_process_batch(batch_size),
                                                     limit=limit)):
        n = int(batch["mask"].sum())
        out, label, truth = box_net.outputs(batch["image"])[:n], batch["label"][:n], \
            batch["boxes"][:n]
        sums[0] += n
        sums[1] += float(objectives.box_correct(out, {"label": label, "boxes": truth}).sum())
        if guesses is None:
            continue
        top = guesses[i][:n]
        picked = np.take_along_axis(out, (top if out.shape[1] > 1 else 0 * top)[..., None],
                                    axis=1)  # (n, 5, 4)
        right = np.stack([boxes.guesses_correct(top[j], boxes.corners(picked[j]), [label[j]],
                                                truth[j]) for j in range(n)])
        sums[2] += right[:, 0].sum()
        sums[3] += right.any(axis=1).sum()
        sums[4] += (top[:, 0] == label).sum()
        sums[5] += (top == label[:, None]).any(axis=1).sum()
    images, true_box, top1, top5, cls1, cls5 = mesh.allgather_sum(sums)
    count = max(images, 1)
    r = dict(dataset=source.name, split=split, protocol="center", images=int(images),
             box_head=box_net.model.box_head, true_class_loc_err=1 - true_box / count)
    if classifier is not None:
        r.update(top1_loc_err=1 - top1 / count, top5_loc_err=1 - top5 / count,
                 top1_cls_err=1 - cls1 / count, top5_cls_err=1 - cls5 / count)
    return r


# ------------------------------------------------------------------------ dense protocol

def window(net) -> int:
    """The side in pixels of the window each position of `net`'s dense map sees: its
    training crop, when fc6's window of pool5 covers that crop (classifier_pool x 32 =
    image_size, as the paper's 7 x 32 = 224); else a position's box has no window."""
    side = STRIDE * net.model.classifier_pool
    if side != net.d.image_size:
        raise UserError(f"the dense protocol needs each map position to see the training crop: "
                        f"this net's fc6 covers {side}x{side} pixels of pool5 "
                        f"(model.classifier_pool={net.model.classifier_pool}) but it trained "
                        f"on {net.d.image_size}x{net.d.image_size} crops")
    return side


def window_boxes(out, height: int, width: int, side: int):
    """A box net's dense map `out` (h, w, K, 4), each box (cx, cy, w, h) in fractions of
    its position's side x side window (which starts STRIDE pixels after its neighbour's),
    as corner boxes (h * w, K, 4) in fractions of the (height, width) image; and the
    windows' centres (h * w, 2) (y, x) in pixels."""
    h, w = out.shape[:2]
    y0, x0 = np.meshgrid(np.arange(h) * STRIDE, np.arange(w) * STRIDE, indexing="ij")
    c = boxes.corners(np.asarray(out, np.float64)) * side  # pixels within the window
    shift = np.stack([x0, y0, x0, y0], axis=-1)[:, :, None, :]
    frac = (c + shift) / np.array([width, height, width, height], np.float64)
    centres = np.stack([y0, x0], axis=-1).reshape(-1, 2) + side / 2
    return frac.reshape(h * w, -1, 4), centres


def _rescaled(net, decoded: np.ndarray, q: int, cache: dict) -> np.ndarray:
    """The whole image with its smaller side Q, as `net`'s pixel convention resizes it."""
    key = (net.d.resampling, net.d.channels, q)
    if key not in cache:
        cache[key] = preprocess.eval_view(decoded, net.d, scale=q, crop=False).numpy()
    return cache[key]


def _softmax(logits, axis=-1):
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _class_map(classifier, decoded, q, cache: dict) -> np.ndarray:
    """The classifier's dense class-score map (h, w, K) of the whole image at scale Q, one
    forward per image and scale for both uses below."""
    key = ("class map", q)
    if key not in cache:
        cache[key] = np.asarray(classifier.dense_map(_rescaled(classifier, decoded, q, cache)),
                                np.float64)
    return cache[key]


def _class_posteriors(classifier, decoded, q, cache: dict) -> np.ndarray:
    """Sec. 3.2's dense class posteriors of the whole image at scale Q (no flip): the
    score map averaged over its positions, then the soft-max."""
    return _softmax(_class_map(classifier, decoded, q, cache).mean(axis=(0, 1)))


def _position_scores(classifier, decoded, q, centres, cache: dict) -> np.ndarray:
    """The classifier's soft-max class scores (P, K) at the positions of its dense map
    nearest the given window centres (pixels of the image at scale Q)."""
    probs = _softmax(_class_map(classifier, decoded, q, cache))
    side = STRIDE * classifier.model.classifier_pool
    idx = [np.clip(np.rint((centres[:, a] - side / 2) / STRIDE).astype(int), 0,
                   probs.shape[a] - 1) for a in (0, 1)]
    return probs[idx[0], idx[1]]


def dense_guesses(box_nets, decoded: np.ndarray, scales, *, classifier=None,
                  true_class: int | None = None, top: int = TOP):
    """The dense protocol on one decoded uint8 image (H, W, C): [(class, corner box in
    fractions of the image, score)], best first: the classifier's `top` classes, or
    `true_class` alone without a classifier; see the module doc."""
    rescaled: dict = {}
    if classifier is not None:
        order = np.argsort(-np.mean([_class_posteriors(classifier, decoded, q, rescaled)
                                     for q in scales], axis=0))[:top]
    else:
        order = np.array([true_class])
    found = {int(c): ([], []) for c in order}  # class -> boxes, scores
    for q in scales:
        for net in box_nets:
            image = _rescaled(net, decoded, q, rescaled)
            frac, centres = window_boxes(net.dense_map(image), image.shape[0], image.shape[1],
                                         window(net))
            scores = (_position_scores(classifier, decoded, q, centres, rescaled)
                      if classifier is not None else None)
            for c in found:
                found[c][0].append(frac[:, c if frac.shape[1] > 1 else 0])
                found[c][1].append(scores[:, c] if scores is not None
                                   else np.ones(len(frac)))
    out = []
    for c in found:
        merged, rating = boxes.merge(np.concatenate(found[c][0]), np.concatenate(found[c][1]))
        out.append((c, merged[0], float(rating[0])))
    return out


def dense_nets(box_nets, classifier=None) -> list:
    """The box nets the dense protocol can run, checked against each other and the
    classifier (one line for what does not fit)."""
    nets = [_box_net(n) for n in box_nets]
    _same_classes(classifier, nets)
    for net in nets:
        window(net)
    return nets


def evaluate_dense(box_nets, data: str, split: str, scales=(), *, classifier=None,
                   data_dir=None, limit: int | None = None) -> dict:
    """The dense localisation result of `box_nets` (their boxes pooled) over a split with
    boxes, at test scales `scales` (default: the first net's test scale); see the module
    doc."""
    nets = dense_nets(box_nets, classifier)
    scales = list(scales) or [preprocess.test_scale(nets[0].d)]
    source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                        jax.process_count(), boxes=True)
    d = nets[0].d
    skipped = eval_data.Skipped(source)
    sums = np.zeros(6)
    for _, label, decoded in eval_data.stream(
            source, lambda raw: preprocess.eval_decode(raw, d), lambda image: image,
            eval_data.local_count(source, limit), skipped, view_boxes=lambda b, h, w: b):
        true_class, truth = int(label["label"]), label["boxes"]
        guesses = dense_guesses(nets, decoded, scales, classifier=classifier,
                                true_class=true_class)
        right = boxes.guesses_correct([g[0] for g in guesses], [g[1] for g in guesses],
                                      [true_class] * len(truth), truth)
        classes_ = np.array([g[0] for g in guesses])
        sums += [1, right[classes_ == true_class].any(), right[:1].any(), right[:TOP].any(),
                 classes_[0] == true_class, (classes_[:TOP] == true_class).any()]
    images, true_box, top1, top5, cls1, cls5 = mesh.allgather_sum(sums)
    count = max(images, 1)
    r = dict(dataset=source.name, split=split, protocol="dense", scales=scales,
             images=int(images), nets=len(nets),
             box_head=",".join(sorted({n.model.box_head for n in nets})),
             true_class_loc_err=1 - true_box / count, **skipped.summary())
    if classifier is not None:
        r.update(top1_loc_err=1 - top1 / count, top5_loc_err=1 - top5 / count,
                 top1_cls_err=1 - cls1 / count, top5_cls_err=1 - cls5 / count)
        del r["true_class_loc_err"]  # the true class is judged only when it is guessed
    return r


def format_result(r: dict) -> str:
    where = ("centre crop" if r["protocol"] == "center" else
             f"dense at Q={','.join(map(str, r['scales']))}"
             + (f", {r['nets']} nets' boxes pooled" if r.get("nets", 1) > 1 else ""))
    lines = [f"{r['split'] or '(folder)'}: {r['images']} images, {where}, "
             f"{r['box_head'].upper()} boxes",
             ]
    if "true_class_loc_err" in r:
        lines.append(f"  localisation error, box of the true class: "
                     f"{100 * r['true_class_loc_err']:.2f}%")
    if "top5_loc_err" in r:
        lines.append(f"  localisation error, the classifier's guesses: top-1 "
                     f"{100 * r['top1_loc_err']:.2f}%, top-5 {100 * r['top5_loc_err']:.2f}% "
                     f"(classification top-1 {100 * r['top1_cls_err']:.2f}%, top-5 "
                     f"{100 * r['top5_cls_err']:.2f}%)")
    return "\n".join(lines)


# ------------------------------------------------------------------ vgg-jax localize

COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4")  # guesses 1-5


def draw(decoded: np.ndarray, guesses, names, path: str) -> None:
    """The image with its guesses' boxes, each labelled with its rank, class name and
    score, written to `path` (PNG)."""
    from PIL import Image, ImageDraw
    image = Image.fromarray(decoded if decoded.shape[-1] == 3 else decoded[..., 0]).convert("RGB")
    scale = max(1, 256 // min(image.size))  # small images are drawn larger, to be read
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(image)
    width = max(1, min(image.size) // 128)
    for rank, (c, box, score) in reversed(list(enumerate(guesses))):
        x0, y0, x1, y1 = boxes.to_pixels(np.clip(boxes.ordered(box), 0, 1), image.height,
                                          image.width)
        colour = COLOURS[rank % len(COLOURS)]
        pen.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        label = f"{rank + 1}. {names[c]} {score:.2f}"
        tx, ty = x0 + width, (y0 - 12 if y0 >= 12 else y0 + width)
        pen.rectangle(pen.textbbox((tx, ty), label), fill=colour)
        pen.text((tx, ty), label, fill="white")
    image.save(path)


def localize(*, weights: str, images, out: str, classifier: str | None = None,
             ensemble=(), scales=(), top: int = TOP, json_output: bool = False) -> list:
    """`vgg-jax localize`: the dense protocol on image files (the boxes of `weights`, and
    of `ensemble`'s nets pooled with them), each class rated by `classifier`'s scores;
    prints each image's guesses and draws them into OUT/<name>.png."""
    import json
    import os

    import tensorflow as tf

    from vgg_jax import storage
    from vgg_jax.weights import Net, read_image_bytes
    if not classifier:
        raise UserError("a box net has no class scores: give --classifier WEIGHTS (a "
                        "classification net of the same classes), whose scores rate the "
                        "boxes as in the paper")
    clf = Net(classifier).require_classifier()
    nets = dense_nets([Net(w) for w in (weights, *ensemble)], clf)
    raws = [read_image_bytes(p) for p in images]  # every file checked before any output
    scales = list(scales) or [preprocess.test_scale(nets[0].d)]
    storage.makedirs(out)
    results = []
    for path, raw in zip(images, raws):
        decoded = preprocess.eval_decode(tf.constant(raw), nets[0].d).numpy()
        guesses = dense_guesses(nets, decoded, scales, classifier=clf, top=top)
        stem = os.path.splitext(os.path.basename(path))[0]
        picture = os.path.join(out, f"{stem}.png")
        draw(decoded, guesses, clf.display_names, picture)
        h, w = decoded.shape[:2]
        found = [dict(rank=i + 1, label=int(c), name=clf.display_names[c], score=score,
                      box=[round(float(v), 2) for v in
                           boxes.to_pixels(np.clip(boxes.ordered(b), 0, 1), h, w)])
                 for i, (c, b, score) in enumerate(guesses)]
        results.append(dict(image=path, picture=picture, guesses=found))
        if json_output:
            continue
        print(f"{path} -> {picture}")
        for g in found:
            x0, y0, x1, y1 = g["box"]
            print(f"  {g['rank']}  {g['score']:8.4f}  {g['name']}  box ({x0:.0f}, {y0:.0f}) - "
                  f"({x1:.0f}, {y1:.0f}) px")
    if json_output:
        print(json.dumps(results))
    return results
