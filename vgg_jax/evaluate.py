"""The paper's test protocols (Sec. 3.2), over weights directories and a dataset split.

center          rescale to Q, centre crop (torchvision style).
dense           rescale the whole image to Q, run the fully-convolutional net, average the
                class score map spatially, soft-max; averaged with the flipped image.
multicrop       5x5 regular grid of crops x 2 flips = 50 crops per scale, soft-max averaged.
The flips follow the weights' own training recipe (meta.json's preprocessing.flip: a net
trained without flips is not averaged with mirror images it never saw); `flip=` overrides.
dense+multicrop both, averaged (the paper's best single-net result, Table 5).
Several scales Q and several nets (fusion, Table 6) average soft-max posteriors.

How it runs at ImageNet scale: every image becomes weighted views (`vgg_jax.views`, the
one path dense and multi-crop views take in every command): views of the same shape from
many images are batched and sharded over this process's devices; dense views are padded
to a bucket and masked, so the number of compiled shapes stays bounded whatever the
number of images. With several processes each takes its own shard of the split (every
example once overall) and the counts are summed. Images that fail to decode are counted
and named in the result (`skipped`, `skipped_images`).
"""
from __future__ import annotations

import json
import signal
import sys
import time

import jax
import numpy as np

from vgg_jax import eval_data, input_pipeline, mesh, preemption, preprocess, views
from vgg_jax.errors import UserError
from vgg_jax.weights import Net


def paper_scales(s: int | None = None, s_min: int | None = None, s_max: int | None = None):
    """Sec. 3.2 multi-scale test: Q = {S-32, S, S+32} for fixed S; {Smin, (Smin+Smax)/2,
    Smax} for S jittered in [Smin, Smax]."""
    if s is not None:
        return [s - 32, s, s + 32]
    return [s_min, (s_min + s_max) // 2, s_max]


def evaluate(nets: list[Net], dataset: str, split: str, protocol: str, scales, *,
             data_dir=None, flip: bool | None = None, limit=None, progress: bool = True,
             batch_size: int = 64, crop_size: int | None = None, stop=None) -> dict | None:
    """Top-1/top-5 error (and the mean log-loss) of the (fused) nets over every example
    of the split once, with the images that failed to decode counted and named. With
    several processes, each evaluates its own shard on its own devices and the counts are
    summed; `limit` takes the first ceil(limit / processes) examples of each shard.
    `stop()`, asked before each example (one process only), ends it early: None."""
    plan = views.Plan(nets, protocol, scales, flip=flip, crop=crop_size)
    pidx, pcount = jax.process_index(), jax.process_count()
    source = input_pipeline.make_source(dataset, split, data_dir, pidx, pcount)
    if source.multi_label:
        raise UserError(f"{source.name} has several labels per image: top-1/top-5 error is "
                        f"for single-label data (vgg-jax transfer reports its mAP)")
    results, skipped, batcher = views.run_split(plan, source, batch_size=batch_size,
                                                limit=limit)
    bar = None
    if progress and pidx == 0:
        from tqdm import tqdm
        bar = tqdm(total=source.total_examples if not limit else min(limit, source.total_examples),
                   desc=f"eval {protocol} {split}", unit="img", dynamic_ncols=True)
    sums, t0 = np.zeros(4), time.time()  # sums: count, top1, top5, -log p
    try:
        for _, label, (p,) in results:
            if stop is not None and stop():
                return None
            label = int(label)
            ranked = np.argsort(-p)
            sums[:] += (1, ranked[0] == label, label in ranked[:5],
                        -np.log(max(float(p[label]), 1e-30)))
            if bar is not None:
                bar.update(pcount)  # every process moves at about the same pace
                bar.set_postfix(img_per_s=f"{sums[0] * pcount / (time.time() - t0):.1f}")
    finally:  # also when a SIGTERM ends it: the bar's last line before the command's
        if bar is not None:
            bar.close()
    images, top1, top5, nll = mesh.allgather_sum(sums)
    count = max(images, 1)
    return dict(dataset=source.name, split=split, protocol=protocol, scales=list(scales),
                nets=len(nets), images=int(images), top1_err=1 - top1 / count,
                top5_err=1 - top5 / count, loss=nll / count, **skipped.summary(),
                processes=pcount, devices=nets[0].num_devices * pcount,
                batch_shapes=len(batcher.shapes))


def format_result(r: dict) -> str:
    return (f"{'split':<12} {'protocol':<16} {'scales':<16} {'nets':>4} {'images':>7} "
            f"{'top-1 err':>10} {'top-5 err':>10}\n"
            f"{r['split'] or '(folder)':<12} {r['protocol']:<16} "
            f"{','.join(map(str, r['scales'])):<16} "
            f"{r['nets']:>4} {r['images']:>7} {100 * r['top1_err']:>9.2f}% "
            f"{100 * r['top5_err']:>9.2f}%" + eval_data.skipped_line(r["skipped_images"]))


def default_scales(d) -> list[int]:
    """The test scale when none is given (preprocess.test_scale)."""
    return [preprocess.test_scale(d)]


def main(*, data: str, weights: str | None = None, ensemble=(), split: str = "test",
         data_dir: str | None = None, protocol: str = "center", scales=(),
         crop: int | None = None, flip: bool | None = None, batch_size: int = 64,
         limit: int | None = None,
         json_output: bool = False, distributed: bool = False,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, task: str = "classification",
         classifier: str | None = None) -> dict:
    """`vgg-jax evaluate`: print (and return) the result of `protocol` over a split with
    one net (`weights`) or the fusion of several (`ensemble`); `task='localisation'`: a box
    net's localisation error (vgg_jax.localise: the centre or dense protocol, several box
    nets' boxes pooled with the dense one, `classifier` for the classes of the guesses)."""
    if distributed:
        mesh.initialize_distributed(coordinator_address, num_processes, process_id)
    dirs = list(ensemble) or ([weights] if weights else [])
    if not dirs:
        raise UserError("give --weights DIR or --ensemble DIR1,DIR2,...")
    if task == "localisation":
        from vgg_jax import localise
        if protocol not in ("center", "dense"):
            raise UserError(f"--task localisation has the paper's two protocols, center "
                            f"(Table 8) and dense (Table 9), not {protocol!r}")
        if protocol == "center" and len(dirs) > 1:
            raise UserError("the centre protocol judges one box net; fuse several with "
                            "--protocol dense (the union of their boxes, Appendix A)")
        helper = Net(classifier).require_classifier() if classifier else None
        box_nets = [Net(d) for d in dirs]
        if protocol == "center":
            r = localise.evaluate_centre(box_nets[0], data, split, classifier=helper,
                                         data_dir=data_dir, batch_size=batch_size, limit=limit)
        else:
            r = localise.evaluate_dense(box_nets, data, split, list(scales), classifier=helper,
                                        data_dir=data_dir, limit=limit)
        if jax.process_index() == 0:
            print(json.dumps(r) if json_output else localise.format_result(r))
        return r
    if classifier:
        raise UserError("--classifier goes with --task localisation")
    nets = [Net(d).require_classifier() for d in dirs]
    try:
        with preemption.stop_on_sigterm():  # nothing to save: end at once, in one line
            r = evaluate(nets, data, split, protocol, list(scales) or default_scales(nets[0].d),
                         data_dir=data_dir, flip=flip, limit=limit, progress=not json_output,
                         batch_size=batch_size, crop_size=crop)
    except preemption.Stopped:
        # the signal can leave the progress bar's line open (it landed while the bar was
        # drawn): the message starts on a line of its own
        print("\nvgg-jax evaluate: stopped by SIGTERM before the end of the split; no result"
              if not json_output else "vgg-jax evaluate: stopped by SIGTERM before the end "
              "of the split; no result", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    if jax.process_index() == 0:
        print(json.dumps(r) if json_output else format_result(r))
    return r
