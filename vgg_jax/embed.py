"""A trained VGG as a feature extractor: one layer's activations for a whole dataset.

fc7 of the centre crop gives a 4096-d image descriptor (with torchvision-width
classifiers); Appendix B's descriptor is different: the dense fc7 map at several scales,
averaged with the flipped image's (`paper_descriptors`, `embed --protocol paper`). Conv
and pool layers give (N, H, W, C) maps, which `embed` averages over space (global
average pooling) unless `pool=False`.
Batches are sharded over every device ('data' mesh axis, like training); every example
of the split is embedded exactly once (the padded tail of the last batch is dropped by
its mask); with several processes each reads its own shard and the results are gathered.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from vgg_jax import choices, conv, eval_data, input_pipeline, mesh, models, pixels, views
from vgg_jax.errors import check_choice
from vgg_jax.weights import Net


def make_embed_fn(model, layer: str, pool: bool = True, devices=None, normalise=None):
    """A jitted (variables, images) -> (N, D) or (N, H, W, C), batch sharded over devices;
    `normalise` (pixels.Pixels) turns uint8 images into the model's input on the device.
    Returns (fn, data_sharding, replicated_sharding)."""
    _, data, replicated = mesh.data_mesh(devices)

    def fn(variables, images):
        if normalise is not None:
            images = normalise(images)
        out = models.extract(model, variables, images, (layer,))[layer]
        if pool and out.ndim == 4:
            out = out.mean(axis=(1, 2))
        return out.astype(np.float32)

    return (conv.jit_eval(fn, in_shardings=(replicated, data), out_shardings=data),
            data, replicated)


def embed(model, variables, source, data_cfg, layer: str = "fc7", batch_size: int = 64, *,
          pool: bool = True, limit: int | None = None, progress: bool = False):
    """(embeddings (N, ...), labels (N,) or multi-hot (N, K), skipped: the names of the
    images that failed to decode, every process's) for every example of `source`, row for row: with
    one process in the source's order, with several process 0's part, then process 1's
    and so on (not the source's order). `batch_size`: images per batch on this process,
    rounded up to a multiple of its devices (as evaluate's and transfer's); `limit`: about
    the first `limit` images in all (ceil(limit / processes) of each process's part)."""
    models.check_layer(model.arch, layer)
    fn, data, replicated = make_embed_fn(model, layer, pool, normalise=pixels.for_data(data_cfg))
    local_batch = mesh.per_process_batch(batch_size)
    limit = None if limit is None else -(-limit // jax.process_count())
    variables = jax.device_put(variables, replicated)
    skipped = eval_data.Skipped(source)
    batches = eval_data.eval_batches(source, data_cfg, local_batch, limit=limit,
                                          skipped=skipped)
    if progress:
        from tqdm import tqdm
        total = -(-(source.max_shard_examples if limit is None else limit) // local_batch)
        batches = tqdm(batches, total=total, desc=f"embed {layer}", unit="batch")
    outs, labels = [], []
    for batch in batches:
        arrays = {k: jax.make_array_from_process_local_data(data, v) for k, v in batch.items()}
        out = fn(variables, arrays["image"])
        gathered = multihost_utils.process_allgather(
            dict(out=out, label=arrays["label"], mask=arrays["mask"]), tiled=True)
        keep = np.asarray(gathered["mask"]) > 0
        outs.append(np.asarray(gathered["out"])[keep])
        labels.append(np.asarray(gathered["label"])[keep])
    return np.concatenate(outs), np.concatenate(labels), skipped.everywhere()


IMAGENET_SCALES = (256, 384, 512)  # Appendix B's Q for the ImageNet nets (S in [256, 512])


def descriptor_scales(d) -> tuple[int, ...]:
    """Appendix B's test scales Q for a net, from the scales it was trained at (`d`: its
    data_config), as Sec. 3.2 derives Q from S: {Smin, (Smin+Smax)/2, Smax} for S jittered
    in [Smin, Smax] (the ImageNet nets: 256, 384, 512), {S-32, S, S+32} for a fixed S;
    for the small-image recipe (the net sees the whole S x S image) {S, 1.5 S, 2 S}, the
    same ratios as 256, 384, 512. Weights that do not record their training scales (the
    published ImageNet ones) get 256, 384, 512."""
    if d.recipe == "small":
        s = int(d.image_size)
        return (s, s * 3 // 2, 2 * s)
    s_min, s_max = d.get("s_min"), d.get("s_max")
    if not s_min:
        return IMAGENET_SCALES
    if s_max and s_max > s_min:
        return (int(s_min), (int(s_min) + int(s_max)) // 2, int(s_max))
    return (int(s_min) - 32, int(s_min), int(s_min) + 32)


def paper_descriptors(net: Net, source, scales=IMAGENET_SCALES, *, layer: str = "fc7",
                      aggregate: str = "average", batch_size: int = 32,
                      limit: int | None = None, progress: bool = False):
    """Appendix B's image descriptors for every example of `source` (this process's
    shard, gathered over processes): at each scale Q the whole image (smallest side Q)
    goes through the fully-convolutional net, the fc7 map is averaged over space and
    with the flipped image's; the scales are averaged (`aggregate='average'`) or
    concatenated ('stack'); the result is L2-normalised. The views run through
    `views.run_split`, as evaluate's. Returns (descriptors, labels (N,) or multi-hot
    (N, K), the names of the images that failed to decode, every process's)."""
    check_choice("aggregate", aggregate, choices.AGGREGATES)
    plan = views.Plan([net], "dense", scales, flip=True, slot_per_scale=aggregate == "stack")
    results, skipped, _ = views.run_split(plan, source, forward=views.features(layer),
                                          batch_size=batch_size, limit=limit)
    n_local = eval_data.local_count(source, limit)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=n_local, desc="paper descriptors", unit="img")
    rows = sorted((pos, label, np.concatenate(slots)) for pos, label, slots in results)
    labels = np.asarray([label for _, label, _ in rows], np.int64)
    desc = np.asarray([d for _, _, d in rows], np.float32).reshape(len(rows), -1)
    desc /= np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
    return (*gather_shards(desc, labels, source.max_shard_examples if limit is None
                           else n_local), skipped.everywhere())


def gather_shards(values: np.ndarray, labels: np.ndarray, rows: int):
    """Every process's (values, labels), padded to `rows` for the collective and
    concatenated in process order (a no-op with one process)."""
    if jax.process_count() == 1:
        return values, labels
    pad = rows - len(values)
    mask = np.concatenate([np.ones(len(values)), np.zeros(pad)]).astype(np.float32)
    padded = dict(v=np.concatenate([values, np.zeros((pad, *values.shape[1:]), values.dtype)]),
                  l=np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)]
                                   ).astype(np.int32),
                  m=mask)
    every = multihost_utils.process_allgather(padded)
    keep = np.asarray(every["m"]).reshape(-1) > 0
    return (np.asarray(every["v"]).reshape(-1, *values.shape[1:])[keep],
            np.asarray(every["l"]).reshape(-1, *labels.shape[1:])[keep].astype(np.int64))


def default_scales(net: Net, quiet: bool = False) -> tuple[int, ...]:
    """Appendix B's scales for `net` when none are given (descriptor_scales: from
    the scales it was trained at), printed so the user sees what was chosen."""
    scales = descriptor_scales(net.d)
    if not quiet and jax.process_index() == 0:
        print(f"scales Q = {', '.join(map(str, scales))} (from the weights' training scales; "
              f"--scales to choose others)")
    return scales


def main(*, weights: str, data: str, out: str, split: str = "test",
         data_dir: str | None = None, layer: str = "fc7", no_pool: bool = False,
         protocol: str = "center", scales=(), aggregate: str = "average",
         batch_size: int = 64, limit: int | None = None) -> None:
    """`vgg-jax embed`: write `layer`'s embeddings of a split, with labels, to `out`:
    of the centre crop (`protocol='center'`), or Appendix B's descriptors ('paper')."""
    check_choice("embed protocol", protocol, choices.EMBED_PROTOCOLS)
    net = Net(weights)
    source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                        jax.process_count())
    if protocol == "paper":
        emb, labels, skipped = paper_descriptors(net, source, tuple(scales) or default_scales(net),
                                        layer=layer, aggregate=aggregate,
                                        batch_size=batch_size, limit=limit, progress=True)
    else:
        emb, labels, skipped = embed(net.model, net.variables, source, net.d, layer, batch_size,
                            pool=not no_pool, limit=limit, progress=True)
    if jax.process_index() == 0:
        np.savez(out, embeddings=emb, labels=labels,
                 class_names=np.asarray(source.class_names), layer=layer,
                 weights=str(weights), data=f"{data}:{split}", multi_label=source.multi_label,
                 skipped_images=np.asarray(skipped, dtype=str))
        kind = "multi-hot labels" if source.multi_label else "labels"
        print(f"wrote {layer} embeddings {emb.shape} and {kind} of {source.name}:"
              f"{source.split} ({len(source.class_names)} classes) to {out}"
              + eval_data.skipped_line(skipped))
