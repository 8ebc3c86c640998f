"""Appendix B: the net as a fixed feature extractor for another dataset. Descriptors
(`embed.paper_descriptors`: dense fc7 at several scales, flip-averaged, L2-normalised)
of one split train a linear SVM (scikit-learn's LinearSVC); its accuracy on another
split's descriptors is the result. The net is not fine-tuned."""
from __future__ import annotations

import json

import jax
import numpy as np

from vgg_jax import embed, input_pipeline
from vgg_jax.weights import Net


def transfer(net: Net, data: str, train_split: str, test_split: str, *, scales,
             aggregate: str = "average", data_dir: str | None = None, c: float = 1.0,
             batch_size: int = 32, limit: int | None = None, progress: bool = False) -> dict:
    """{'accuracy', 'train_images', 'test_images', ...} of a linear SVM trained on the
    descriptors of `train_split` and tested on those of `test_split`."""
    from sklearn.svm import LinearSVC
    out = {}
    for role, split in (("train", train_split), ("test", test_split)):
        source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                            jax.process_count())
        out[role] = embed.paper_descriptors(net, source, scales, aggregate=aggregate,
                                            batch_size=batch_size, limit=limit,
                                            progress=progress)
    (x_train, y_train), (x_test, y_test) = out["train"], out["test"]
    svm = LinearSVC(C=c, max_iter=10_000).fit(x_train, y_train)
    accuracy = float(np.mean(svm.predict(x_test) == y_test))
    return dict(accuracy=accuracy, train_images=len(y_train), test_images=len(y_test),
                scales=list(scales), aggregate=aggregate, descriptor_dim=int(x_train.shape[1]),
                data=data, train_split=train_split, test_split=test_split)


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
        print(json.dumps(r) if json_output else
              f"linear SVM on Appendix B descriptors ({r['descriptor_dim']}-d, scales "
              f"{','.join(map(str, r['scales']))}, {r['aggregate']}): accuracy "
              f"{100 * r['accuracy']:.2f}% on {r['test_images']} {test_split} images "
              f"(trained on {r['train_images']} {train_split} images)")
    return r
