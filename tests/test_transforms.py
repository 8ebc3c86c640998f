"""Every JAX transformation on the default model (issue 27): jax.jvp, jax.linearize,
jax.jacfwd, jax.hessian, jax.jvp of jax.grad, and jax.vmap of each, in training and in
inference mode, per conv algorithm, equal to the model with XLA's own conv. In float64,
so that the comparison is of the algebra, not of rounding (in float32 a ReLU gate or a
max-pool tie that rounding flips moves a few values by much more than the rounding).
The net is VGG-11 (config A) at width 1/8 (8-64 channels), 8-wide fc layers, 32x32
inputs, one image (vmap over two): F(2x2) and F(4x4) in every layer, chosen explicitly
('auto' gives a net this small XLA's conv and im2col, whose rules are JAX's own; it mixes
the algorithms in tests/test_conv_impl.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import models

# F(2x2) in every transform (dropout 0: training and inference are the same function);
# F(4x4) shares F(2x2)'s primitive rules (jvp, transpose, batching; only the tile size
# differs), so it takes the two compositions that between them apply every rule: each
# transform above costs a compile of every layer's F(4x4) kernels (~90 s for all nine).
CASES = [("winograd", True, None), ("winograd4", True, ("jvp_of_grad", "vmap_hessian"))]


def close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == np.float64 and u.shape == v.shape
        np.testing.assert_allclose(u, v, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(v).max()))


@pytest.mark.parametrize("impl, train, only", CASES,
                         ids=["winograd", "winograd4"])
def test_every_transform_matches_xla(impl, train, only):
    with jax.enable_x64(True):
        base = models.create_model("A", num_classes=3, width=1 / 8, fc_widths=(8, 8),
                                   classifier_pool=1, dropout_rate=0.0, dtype=jnp.float64)
        r = np.random.default_rng(0)
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         models.init_variables(base, jax.random.key(0), 32)["params"])
        x = jnp.asarray(r.normal(size=(1, 32, 32, 3)))
        t = jnp.asarray(r.normal(size=(2, 1, 32, 32, 3)))  # two input directions
        dp = jax.tree.map(lambda a: jnp.asarray(r.normal(size=a.shape)), p)
        xs = jnp.asarray(r.normal(size=(2, 1, 32, 32, 3)))  # for vmap

        def transforms(model):
            f = lambda p, x: model.apply({"params": p}, x, train=train)
            along = lambda s: f(p, x + s[0] * t[0] + s[1] * t[1])  # 2 -> (1, 3)
            loss = lambda p, x: jnp.sum(jnp.sin(f(p, x)))
            out = {
                "jvp": lambda: jax.jvp(lambda x: f(p, x), (x,), (t[0],)),
                "linearize": lambda: jax.linearize(lambda x: f(p, x), x)[1](t[1]),
                "jacfwd": lambda: jax.jacfwd(along)(jnp.zeros(2)),
                "hessian": lambda: jax.hessian(lambda s: jnp.sum(along(s) ** 2))(jnp.zeros(2)),
                "jvp_of_grad": lambda: jax.jvp(lambda p: jax.grad(loss)(p, x), (p,), (dp,)),
                "vmap_jvp": lambda: jax.vmap(
                    lambda x: jax.jvp(lambda x: f(p, x), (x,), (t[0],)))(xs),
                "vmap_jacfwd": lambda: jax.vmap(
                    lambda x: jax.jacfwd(lambda s: f(p, x + s[0] * t[0]))(jnp.zeros(1)))(xs),
                "vmap_hessian": lambda: jax.vmap(lambda x: jax.hessian(
                    lambda s: jnp.sum(f(p, x + s[0] * t[0] + s[1] * t[1]) ** 2))(
                        jnp.zeros(2)))(xs),
                "vmap_jvp_of_grad": lambda: jax.vmap(
                    lambda x: jax.jvp(lambda p: jax.grad(loss)(p, x), (p,), (dp,)))(xs),
            }
            return {k: v() for k, v in out.items() if only is None or k in only}

        got = jax.jit(lambda: transforms(base.clone(conv_impl=impl)))()
        want = jax.jit(lambda: transforms(base.clone(conv_impl="xla")))()
        for name in want:
            close(got[name], want[name])
        assert np.abs(np.asarray(want["hessian" if only is None else "vmap_hessian"])).max() > 0
