"""Appendix B: the net as a fixed feature extractor for another dataset. Descriptors
(`embed.paper_descriptors`: dense fc7 at several scales, flip-averaged, L2-normalised)
of one split train linear SVMs (scikit-learn's LinearSVC); the result is measured on
another split's descriptors: accuracy for single-label data (Caltech, one multi-class
SVM), and for multi-label data (VOC: several labels per image) the paper's mean average
precision of one-vs-rest SVMs, one per class, ranked by their decision values. The net
is not fine-tuned."""
from __future__ import annotations

import json

import jax
import numpy as np

from vgg_jax import embed, eval_data, input_pipeline
from vgg_jax.errors import UserError
from vgg_jax.weights import Net


def transfer(net: Net, data: str, train_split: str, test_split: str, *, scales,
             aggregate: str = "average", data_dir: str | None = None, c: float = 1.0,
             batch_size: int = 32, limit: int | None = None, progress: bool = False) -> dict:
    """{'accuracy' (single-label) or 'mAP' and 'ap' per class (multi-label),
    'train_images', 'test_images', 'skipped_images', ...} of linear SVMs trained on the
    descriptors of `train_split` and tested on those of `test_split`."""
    out = {}
    for role, split in (("train", train_split), ("test", test_split)):
        source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                            jax.process_count())
        multi, class_names = source.multi_label, source.class_names
        out[role] = embed.paper_descriptors(net, source, scales, aggregate=aggregate,
                                            batch_size=batch_size, limit=limit,
                                            progress=progress)
    (x_train, y_train, skip_train), (x_test, y_test, skip_test) = out["train"], out["test"]
    r = (mean_average_precision(x_train, y_train, x_test, y_test, c, class_names) if multi
         else dict(accuracy=single_label_accuracy(x_train, y_train, x_test, y_test, c)))
    return dict(r, train_images=len(y_train), test_images=len(y_test),
                scales=list(scales), aggregate=aggregate, descriptor_dim=int(x_train.shape[1]),
                data=data, train_split=train_split, test_split=test_split,
                skipped=len(skip_train) + len(skip_test),
                skipped_images=list(skip_train) + list(skip_test))


def single_label_accuracy(x_train, y_train, x_test, y_test, c: float) -> float:
    from sklearn.svm import LinearSVC
    svm = LinearSVC(C=c, max_iter=10_000).fit(x_train, y_train)
    return float(np.mean(svm.predict(x_test) == y_test))


def mean_average_precision(x_train, y_train, x_test, y_test, c: float, class_names) -> dict:
    """Appendix B's VOC protocol: per class, a linear SVM of that class against the rest;
    its decision values rank the test images; average precision of that ranking (the
    area under the interpolation-free precision-recall curve, scikit-learn's); mAP is the
    mean over the classes with a positive test image. Labels are multi-hot (N, K)."""
    from sklearn.metrics import average_precision_score
    from sklearn.svm import LinearSVC
    ap = {}
    for k, name in enumerate(class_names):
        train_k, test_k = y_train[:, k] > 0, y_test[:, k] > 0
        if not test_k.any():
            continue  # no positive to rank: AP undefined
        if train_k.all() or not train_k.any():  # one class in training: a constant ranking
            scores = np.full(len(x_test), float(train_k.all()))
        else:
            scores = LinearSVC(C=c, max_iter=10_000).fit(x_train, train_k).decision_function(x_test)
        ap[name] = float(average_precision_score(test_k, scores))
    if not ap:
        raise UserError("no class has a positive image in the test split: mAP is undefined")
    return dict(mAP=float(np.mean(list(ap.values()))), ap=ap)


def main(*, weights: str, data: str, train_split: str = "train", test_split: str = "test",
         scales=(), aggregate: str = "average", data_dir: str | None = None, c: float = 1.0,
         batch_size: int = 32, limit: int | None = None, json_output: bool = False) -> dict:
    """`vgg-jax transfer`: print the linear-SVM accuracy (Appendix B) of `weights`'
    descriptors on `data`."""
    net = Net(weights)
    scales = tuple(scales) or embed.default_scales(net, quiet=json_output)
    r = transfer(net, data, train_split, test_split, scales=scales, aggregate=aggregate,
                 data_dir=data_dir, c=c, batch_size=batch_size, limit=limit,
                 progress=not json_output)
    if jax.process_index() == 0:
        result = (f"accuracy {100 * r['accuracy']:.2f}%" if "accuracy" in r else
                  f"mean average precision {100 * r['mAP']:.2f}% over {len(r['ap'])} classes "
                  f"(one-vs-rest SVMs)")
        print(json.dumps(r) if json_output else
              f"linear SVM on Appendix B descriptors ({r['descriptor_dim']}-d, scales "
              f"{','.join(map(str, r['scales']))}, {r['aggregate']}): {result} on "
              f"{r['test_images']} {test_split} images (trained on {r['train_images']} "
              f"{train_split} images)" + eval_data.skipped_line(r["skipped_images"]))
    return r
