"""A trained VGG as a feature extractor: one layer's activations for a whole dataset.

fc7 gives the 4096-d image descriptor the paper uses on other datasets (Sec. 4 /
Appendix B; with torchvision-width classifiers). Conv and pool layers give (N, H, W, C)
maps, which `embed` averages over space (global average pooling) unless `pool=False`.
Batches are sharded over every device ('data' mesh axis, like training); every example
of the split is embedded exactly once (the padded tail of the last batch is dropped by
its mask); with several processes each reads its own shard and the results are gathered.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from vgg_jax import conv, input_pipeline, mesh, models, pixels
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
    """(embeddings (N, ...), labels (N,)) for every example of `source`, in the order of
    the processes' shards. `batch_size` is global; it is rounded up to a multiple of the
    device count."""
    models.check_layer(model.arch, layer)
    fn, data, replicated = make_embed_fn(model, layer, pool, normalise=pixels.for_data(data_cfg))
    n_dev = len(data.mesh.devices.flat)
    pcount = jax.process_count()
    global_batch = -(-batch_size // n_dev) * n_dev
    local_batch = global_batch // pcount
    variables = jax.device_put(variables, replicated)
    batches = input_pipeline.eval_batches(source, data_cfg, local_batch, limit=limit)
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
    return np.concatenate(outs), np.concatenate(labels)


def main(*, weights: str, data: str, out: str, split: str = "test",
         data_dir: str | None = None, layer: str = "fc7", no_pool: bool = False,
         batch_size: int = 64, limit: int | None = None) -> None:
    """`vgg-jax embed`: write `layer`'s embeddings of a split, with labels, to `out`."""
    net = Net(weights)
    source = input_pipeline.make_source(data, split, data_dir, jax.process_index(),
                                        jax.process_count())
    emb, labels = embed(net.model, net.variables, source, net.d, layer, batch_size,
                        pool=not no_pool, limit=limit, progress=True)
    if jax.process_index() == 0:
        np.savez(out, embeddings=emb, labels=labels,
                 class_names=np.asarray(source.class_names), layer=layer,
                 weights=str(weights), data=f"{data}:{split}")
        print(f"wrote {layer} embeddings {emb.shape} and labels of {source.name}:"
              f"{source.split} ({len(source.class_names)} classes) to {out}")
