"""VGG as a loss network against PyTorch, in the same run: LPIPS (VGG-16 trunk, v0.1)
forward and forward+backward (the gradient an image-generation loss needs) against the
`lpips` package, and one step of Gatys' style transfer (VGG-19, average pools, content
relu4_2, style relu1_1 ... relu5_1, Adam on the pixels) against the same step written in
PyTorch on torchvision's VGG-19.

    python bench/bench_perceptual.py [--sizes 64,256] [--batches 16,4] [--json] [--smoke]

vgg_jax through its public API after `vgg_jax.configure_cpu()` (perceptual.lpips,
stylize.losses_fn); torch eager in both memory formats, the faster counts. Both sides
use random weights (the same trunk converted, for LPIPS), which cost the same as trained
ones. Best of --repeats loops of --steps after a warm-up step; images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sig(x: float) -> float:
    """A rate to four significant digits (two decimals lose a slow row's ratio)."""
    return float(f"{x:.4g}")


def timed(fn, steps, repeats):
    fn()  # warm-up: compiles
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--batches", default="16,4")
    ap.add_argument("--stylize-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--conv-impl", default="auto", help="vgg_jax's conv algorithm (auto: per layer)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, one repeat, XLA's conv (compiles fastest): the tests")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sizes, a.batches, a.stylize_size, a.steps, a.repeats = "32", "2", 32, 1, 1
        a.conv_impl = "xla"
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vgg_jax
    vgg_jax.runtime.quiet_tensorflow()
    vgg_jax.configure_cpu()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch
    from conftest import import_torchvision, lpips_reference  # the real torchvision
    from machine import cpu_line
    tv = import_torchvision()

    from vgg_jax import convert, models, perceptual, pixels, stylize
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    ref, sd = lpips_reference()
    fn, params = perceptual.lpips(backbone=convert.from_torch(sd, "vgg16", include_top=False),
                                  conv_impl=a.conv_impl)
    fwd = jax.jit(fn)
    fwd_bwd = jax.jit(jax.value_and_grad(lambda x0, x1: fn(params, x0, x1).sum()))
    for size, batch in zip(map(int, a.sizes.split(",")), map(int, a.batches.split(","))):
        rng = np.random.default_rng(0)
        x0 = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
        x1 = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
        t0, t1 = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (x0, x1))
        jf = timed(lambda: fwd(params, x0, x1).block_until_ready(), a.steps, a.repeats)
        jb = timed(lambda: jax.block_until_ready(fwd_bwd(x0, x1)), a.steps, a.repeats)
        torch_times = {}
        for fmt in ("contiguous", "channels_last"):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            net = ref.to(memory_format=mf)
            u0, u1 = t0.to(memory_format=mf), t1.to(memory_format=mf)

            def torch_fwd():
                with torch.no_grad():
                    net(u0, u1)

            def torch_fwd_bwd():
                v = u0.detach().requires_grad_(True)
                net(v, u1).sum().backward()
            torch_times[fmt] = (timed(torch_fwd, a.steps, a.repeats),
                                timed(torch_fwd_bwd, a.steps, a.repeats))
        fmt = min(torch_times, key=lambda k: sum(torch_times[k]))
        tf_, tb = torch_times[fmt]
        for what, j, t in (("lpips forward", jf, tf_), ("lpips forward+backward", jb, tb)):
            rows.append(dict(row=what, size=size, batch=batch, jax_img_s=sig(batch / j),
                             torch_img_s=sig(batch / t), vs_torch=round(t / j, 3),
                             torch_format=fmt))

    # one Gatys step at --stylize-size
    s = a.stylize_size
    torch.manual_seed(0)
    vgg = tv.models.vgg19(weights=None).features.eval()
    for i, m in enumerate(vgg):
        if isinstance(m, torch.nn.MaxPool2d):
            vgg[i] = torch.nn.AvgPool2d(2, 2)
    for p in vgg.parameters():
        p.requires_grad_(False)
    variables = convert.from_torch({f"features.{k}": v.numpy() for k, v in vgg.state_dict().items()},
                                   "vgg19", include_top=False)
    model = models.create_model("vgg19", include_top=False, pooling="avg", conv_impl=a.conv_impl)
    norm = pixels.Pixels((0.485 * 255, 0.456 * 255, 0.406 * 255),  # torchvision's mean/std
                         (0.229 * 255, 0.224 * 255, 0.225 * 255))
    rng = np.random.default_rng(1)
    content, style = (rng.uniform(0, 1, (s, s, 3)).astype(np.float32) for _ in range(2))
    terms = stylize.losses_fn(model, variables, norm, content, style)
    tx = optax.adam(0.02)

    @jax.jit
    def jstep(image, opt_state):
        g = jax.grad(lambda im: (lambda c, st: c + 1e6 * st)(*terms(im)))(image)
        updates, opt_state = tx.update(g, opt_state, image)
        return jnp.clip(optax.apply_updates(image, updates), 0, 1), opt_state
    state = [jnp.asarray(content), tx.init(jnp.asarray(content))]

    def jax_step():
        state[:] = jstep(*state)
        jax.block_until_ready(state[0])
    js = timed(jax_step, a.steps, a.repeats)

    idx = models.torchvision_index("vgg19")
    taps = [idx[t] for t in (stylize.CONTENT_TAP, *stylize.STYLE_TAPS)]
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)

    def torch_feats(x):
        out, h = {}, (x - mean) / std
        for i, m in enumerate(vgg[:max(taps) + 1]):
            h = m(h)
            if i in taps:
                out[i] = h
        return out

    def tgram(f):
        n, c, hh, ww = f.shape
        m = f.reshape(n, c, hh * ww)
        return m @ m.transpose(1, 2) / (c * hh * ww)
    tc = torch.from_numpy(content.transpose(2, 0, 1)[None].copy())
    ts = torch.from_numpy(style.transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        target_c = torch_feats(tc)[taps[0]]
        target_g = {i: tgram(f) for i, f in torch_feats(ts).items() if i != taps[0]}
    image = tc.clone().requires_grad_(True)
    opt = torch.optim.Adam([image], lr=0.02)
    for m in vgg:  # in-place ReLUs would overwrite the kept taps
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False

    def torch_step():
        opt.zero_grad()
        f = torch_feats(image)
        loss = ((f[taps[0]] - target_c) ** 2).mean() + 1e6 * sum(
            ((tgram(f[i]) - g) ** 2).mean() for i, g in target_g.items()) / len(target_g)
        loss.backward()
        opt.step()
        with torch.no_grad():
            image.clamp_(0, 1)
    ts_ = timed(torch_step, a.steps, a.repeats)
    rows.append(dict(row="stylize step", size=s, batch=1, jax_img_s=sig(1 / js),
                     torch_img_s=sig(1 / ts_), vs_torch=round(ts_ / js, 3),
                     torch_format="contiguous"))
    out = dict(machine=cpu_line(), torch=torch.__version__, jax=jax.__version__, rows=rows)
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['machine']}; torch {out['torch']}, jax {out['jax']}; best of {a.repeats}")
    print(f"{'row':<24} {'size':>5} {'batch':>5} {'vgg_jax img/s':>14} {'torch img/s':>12} "
          f"{'ratio':>6}  torch format")
    for r in rows:
        print(f"{r['row']:<24} {r['size']:>5} {r['batch']:>5} {r['jax_img_s']:>14} "
              f"{r['torch_img_s']:>12} {r['vs_torch']:>5}x  {r['torch_format']}")


if __name__ == "__main__":
    main()
