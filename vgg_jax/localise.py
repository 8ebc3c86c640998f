"""`vgg-jax evaluate --task localisation`: the paper's localisation measure (Appendix A)
for a box net, on a dataset with boxes, with the centre-crop protocol of its Table 8.

Each image's centre view (the same view `evaluate`'s 'center' protocol and training-time
validation take) goes through the box net. Without a classifier the box of the true class
is judged (Table 8: "only the box for the ground-truth class is considered", which factors
out classification). With `classifier` (a classification net's weights) its five best
classes on the same image are the five guesses, each with the box net's box for that class
(SCR: its one box), and the result is ILSVRC's top-1 and top-5 localisation error
(a guess is right when its class is the image's and its box overlaps one of the class's
boxes by IoU > 0.5), with the classifier's own error beside it.
"""
from __future__ import annotations

import jax
import numpy as np

from vgg_jax import boxes, eval_data, input_pipeline, mesh, objectives
from vgg_jax.errors import UserError


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
    if not box_net.model.box_head:
        raise UserError("--task localisation needs a box net's weights (a run of "
                        "digits_localisation, or any config with model.box_head='scr'|'pcr')")
    source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                        jax.process_count(), boxes=True)
    if classifier is not None and classifier.model.num_classes != box_net.model.num_classes:
        raise UserError(f"the classifier has {classifier.model.num_classes} classes and the "
                        f"box net {box_net.model.num_classes}: they must name the same classes")
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


def format_result(r: dict) -> str:
    lines = [f"{r['split'] or '(folder)'}: {r['images']} images, centre crop, "
             f"{r['box_head'].upper()} boxes",
             f"  localisation error, box of the true class: {100 * r['true_class_loc_err']:.2f}%"]
    if "top5_loc_err" in r:
        lines.append(f"  localisation error, the classifier's guesses: top-1 "
                     f"{100 * r['top1_loc_err']:.2f}%, top-5 {100 * r['top5_loc_err']:.2f}% "
                     f"(classification top-1 {100 * r['top1_cls_err']:.2f}%, top-5 "
                     f"{100 * r['top5_cls_err']:.2f}%)")
    return "\n".join(lines)
