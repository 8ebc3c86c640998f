"""Each conv implementation equals XLA's lax.conv_general_dilated, outputs and gradients."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import conv, models, winograd


def reference(x, k, b):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if b is None else y + b


@pytest.mark.parametrize("impl", ["im2col", "winograd", "winograd4"])
@pytest.mark.parametrize("ksize", [3, 1])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_each_impl_matches_xla_outputs_and_gradients(impl, ksize, with_bias, dtype, tol):
    """Odd sizes (9x7: Winograd's 2x2 and 4x4 tiles overhang and are cropped)."""
    r = np.random.default_rng(ksize + 2 * with_bias)
    x = jnp.asarray(r.normal(size=(2, 9, 7, 5)), dtype)
    k = jnp.asarray(r.normal(size=(ksize, ksize, 5, 6)) * 0.3, dtype)
    b = jnp.asarray(r.normal(size=(6,)), dtype) if with_bias else None

    def ours(x, k, b):
        y = conv.conv2d(x, k, impl)
        return y if b is None else y + b

    np.testing.assert_allclose(np.asarray(ours(x, k, b), np.float32),
                               np.asarray(reference(x, k, b), np.float32), rtol=tol, atol=tol * 3)
    loss = lambda f: (lambda x, k, b: jnp.sum(jnp.sin(f(x, k, b).astype(jnp.float32))))
    argn = (0, 1, 2) if with_bias else (0, 1)
    g1 = jax.grad(loss(ours), argn)(x, k, b)
    g2 = jax.grad(loss(reference), argn)(x, k, b)
    for a, c in zip(g1, g2):  # rounding of a sum scales with its largest terms, hence atol
        c = np.asarray(c, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), c, rtol=tol,
                                   atol=tol * np.abs(c).max())


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 4), (5, 3), (4, 8), (13, 6)])
def test_winograd_on_maps_smaller_than_or_not_a_multiple_of_its_tiles(hw, tile):
    """conv5 at small inputs: 1x1 and 2x2 maps, one partial tile; odd maps; whole tiles."""
    r = np.random.default_rng(sum(hw))
    x = jnp.asarray(r.normal(size=(3, *hw, 4)), jnp.float32)
    k = jnp.asarray(r.normal(size=(3, 3, 4, 7)), jnp.float32)
    want = reference(x, k, None)  # rounding error scales with the largest outputs
    np.testing.assert_allclose(conv.winograd_conv3x3(x, k, tile), want,
                               rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_over_batch_chunks_matches_xla_outputs_and_gradients(tile, monkeypatch):
    """A chunk budget of one 6x5x7 image: the batch of 4 runs as 4 chunks, forward and
    backward (the fori_loop path, which the small maps of the other tests never take)."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 6 * 5 * 7 * 4)
    assert winograd.batch_chunks((4, 6, 5, 3), 7) == 4
    r = np.random.default_rng(tile)
    x = jnp.asarray(r.normal(size=(4, 6, 5, 3)), jnp.float32)
    k = jnp.asarray(r.normal(size=(3, 3, 3, 7)) * 0.3, jnp.float32)
    f = jax.jit(lambda x, k: conv.winograd_conv3x3(x, k, tile))
    np.testing.assert_allclose(f(x, k), reference(x, k, None), rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda x, k: jnp.sum(jnp.sin(f(x, k))))
    g1 = jax.jit(jax.grad(loss(f), (0, 1)))(x, k)
    g2 = jax.grad(loss(lambda x, k: reference(x, k, None)), (0, 1))(x, k)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(c).max())


def test_batch_chunks_are_the_fewest_that_fit_the_budget():
    mb = 1 << 20
    assert winograd.batch_chunks((128, 32, 32, 64), 64) == 4  # 32 MB of map -> 4 x 8 MB
    assert winograd.batch_chunks((16, 224, 224, 64), 64) == 16  # 12.25 MB an image: one each
    assert winograd.batch_chunks((128, 4, 4, 512), 512) == 1  # 4 MB in all
    assert winograd.batch_chunks((6, 64, 64, 128), 256) == 3  # 4 MB an image: 3 chunks of 2
    assert winograd.batch_chunks((5, 64, 64, 256), 256) == 5  # 5 is prime: one image each
    assert winograd.CHUNK_BYTES == 8 * mb
    # data parallel over 4 devices: 4 images each, one per chunk; 4 does not divide 6
    assert winograd.batch_chunks((16, 224, 224, 64), 64, devices=4) == 4
    # the budget is the whole chunk's, on one device or eight: 32 MB -> 4 chunks of 8 MB
    assert winograd.batch_chunks((128, 32, 32, 64), 64, devices=8) == 4
    assert winograd.batch_chunks((6, 64, 64, 128), 256, devices=4) == 3


SHARDED_CHUNKS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from vgg_jax import conv, mesh, winograd
# 16 images (2 a device) per chunk: 32 images -> 2 chunks
winograd.CHUNK_BYTES = 16 * 6 * 6 * 8 * 4
m = mesh.data_mesh()[0]
r = np.random.default_rng(0)
x = jax.device_put(r.normal(size=(32, 6, 6, 3)).astype(np.float32), NamedSharding(m, P("data")))
k = jax.device_put((r.normal(size=(3, 3, 3, 8)) * 0.3).astype(np.float32), NamedSharding(m, P()))
ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
loss = lambda f: jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1))
step = jax.jit(loss(lambda x, k: conv.winograd_conv3x3(x, k, 2)))
assert winograd.batch_chunks(x.shape, 8, jax.device_count()) == 2
assert "all-gather" not in step.lower(x, k).compile().as_text()
(l1, g1), (l2, g2) = step(x, k), loss(ref)(x, k)
np.testing.assert_allclose(l1, l2, rtol=1e-5)
for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
assert g1[0].sharding.spec == P("data")
print("ok")
"""


def test_winograd_chunks_of_a_sharded_batch_stay_on_their_devices():
    """Data parallel over 4 (fake CPU) devices: each chunk takes every device's own
    images, so XLA gathers none of the batch; values and the input gradient's sharding
    are those of a plain conv."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-c", SHARDED_CHUNKS], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_winograd_backward_keeps_only_its_input_and_kernel(capsys):
    """Reverse mode's residuals: x and the kernel, not the transformed tiles (16 or 36
    arrays of 2.25-4x the map between them) that autodiff would keep."""
    from jax.ad_checkpoint import print_saved_residuals
    x = jnp.ones((2, 8, 8, 4))
    k = jnp.ones((3, 3, 4, 5))
    for tile in (2, 4):
        print_saved_residuals(lambda x, k: conv.winograd_conv3x3(x, k, tile), x, k)
        lines = capsys.readouterr().out.strip().splitlines()
        assert sorted(lines) == ["f32[2,8,8,4] from the argument x",
                                 "f32[3,3,4,5] from the argument k"], lines


def test_default_xla_flags_add_each_cpu_option_the_user_has_not_set(monkeypatch):
    monkeypatch.delenv(conv.KEEP_XLA_FLAGS, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert conv.set_default_xla_flags()
    flags = os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=2 ")
    assert "--xla_cpu_use_fusion_emitters=false" in flags and "INDIVIDUAL_CONVOLUTION" in flags
    assert ("--xla_backend_extra_options=xla_cpu_disable_loop_unrolling,"
            "xla_cpu_disable_slp_vectorizer") in flags
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in flags
    assert not conv.set_default_xla_flags()  # all set now: unchanged
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    assert conv.set_default_xla_flags()  # the user's value stays, the other option is added
    flags = os.environ["XLA_FLAGS"]
    assert "fusion_emitters=false" not in flags and "ynn_fusion_type" in flags
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(conv.KEEP_XLA_FLAGS, "1")
    assert not conv.set_default_xla_flags() and os.environ["XLA_FLAGS"] == ""


STEP_TEMPORARIES = """
import vgg_jax
vgg_jax.configure_cpu()  # what the commands call first; the import alone sets nothing
import jax, jax.numpy as jnp, optax
from vgg_jax import models
model = models.create_model("vgg11", num_classes=10, width=1 / 8, fc_widths=(64, 64),
                            classifier_pool=1)
params = models.abstract_variables(model, 32)["params"]
tx = optax.sgd(0.01, momentum=0.9)

def step(params, opt_state, x, y):
    def loss(p):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

compiled = jax.jit(step).lower(params, jax.eval_shape(tx.init, params),
                               jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32),
                               jax.ShapeDtypeStruct((64,), jnp.int32)).compile()
print(compiled.memory_analysis().temp_size_in_bytes)
"""


def test_the_training_step_compiles_with_the_memory_minimizing_scheduler():
    """A training step (VGG-11 at width 1/8, small for the test, 32x32 batch 64: F(2x2) in
    conv3_2 and conv4_2, XLA's conv and im2col in the others) keeps
    fewer temporaries alive with `vgg_jax.configure_cpu()`'s XLA_FLAGS than with XLA:CPU's concurrency-
    optimized scheduler, which a user's own XLA_FLAGS value still chooses (a compile
    option per jit does not reach the scheduler in jaxlib 0.10.2)."""
    def temporaries(xla_flags):
        env = dict(os.environ, XLA_FLAGS=xla_flags)
        env.pop(conv.KEEP_XLA_FLAGS, None)
        r = subprocess.run([sys.executable, "-c", STEP_TEMPORARIES], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return int(r.stdout.split()[-1])

    ours = temporaries("")
    concurrent = temporaries("--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert ours < 0.9 * concurrent, (ours, concurrent)


def test_winograd_matrices_are_the_minimal_filtering_algorithm():
    """A^T [(G g) * (B^T d)] = the 'valid' correlation of a (tile+2)-tap signal d with the
    3-tap filter g, for every basis d and g (exact in float64): the tables hold no typo."""
    for tile, (bt, g, at) in winograd.WINOGRAD.items():
        bt, g, at = (np.asarray(m, np.float64) for m in (bt, g, at))
        for i in range(tile + 2):
            for j in range(3):
                d, f = np.eye(tile + 2)[i], np.eye(3)[j]
                want = np.correlate(d, f, mode="valid")
                np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), want, atol=1e-12)


def test_auto_resolves_per_backend():
    cpu = functools.partial(conv.resolve_conv_impl, "auto", "cpu")
    assert cpu(train=True, hw=(224, 224), channels=3) == "xla"  # conv1_1
    assert cpu(train=True, hw=(64, 64), channels=1) == "im2col"  # a grayscale conv1_1
    assert cpu(train=True, hw=(224, 224), channels=64) == "winograd"
    assert cpu(train=True, hw=(32, 32), channels=64) == "winograd"
    assert cpu(train=True, hw=(16, 16), channels=32) == "winograd"
    assert cpu(train=True, hw=(16, 16), channels=8) == "xla"
    assert cpu(train=True, hw=(56, 56), channels=256) == "winograd4"
    assert cpu(train=True, hw=(14, 14), channels=512) == "winograd"  # 14: not whole 4x4 tiles
    assert cpu(train=True, hw=(56, 56), channels=256, dtype=jnp.bfloat16) == "winograd"
    assert cpu(train=True, hw=(2, 2), channels=512) == "im2col"
    assert cpu(train=True, hw=(8, 8), channels=512, kernel=1) == "im2col"
    assert cpu(train=False, hw=(112, 112), channels=128) == "xla"
    assert cpu(train=False, hw=(56, 56), channels=256) == "winograd"
    assert cpu(train=False, hw=(14, 14), channels=512) == "winograd"
    assert cpu(train=False, hw=(14, 14), channels=64) == "winograd"
    assert cpu(train=False, hw=(64, 64), channels=64) == "winograd"
    assert cpu(train=False, hw=(14, 14), channels=32) == "xla"
    assert cpu(train=False, hw=(2, 2), channels=64) == "im2col"
    # the work rules (batch x pixels x Cin x Cout), bench/RESULTS.md 2026-12-07
    layer = lambda hw, cin, cout, batch, train: cpu(train=train, hw=hw, channels=cin,
                                                    out_channels=cout, batch=batch)
    assert layer((8, 8), 16, 16, 64, True) == "xla"  # 1M: a width-1/16 VGG-11 on digits
    assert layer((8, 8), 32, 64, 32, True) == "winograd"  # 4.2M
    assert layer((16, 16), 16, 32, 64, True) == "winograd"
    assert layer((4, 4), 512, 512, 16, True) == "im2col"  # 256 pixels < 2 x 512
    assert layer((4, 4), 512, 512, 64, True) == "winograd"  # 1,024 pixels
    assert layer((8, 8), 256, 256, 8, True) == "winograd4"  # 512 pixels = 2 x 256
    assert layer((8, 8), 256, 256, 4, True) == "im2col"
    assert layer((64, 64), 1, 16, 128, True) == "im2col"  # few channels first
    assert layer((4, 4), 128, 128, 128, False) == "xla"  # 33.6M: saves ~0 ms a call
    assert layer((4, 4), 512, 512, 16, False) == "winograd"  # 2^26 exactly
    assert layer((64, 64), 64, 64, 16, False) == "winograd"  # LPIPS at 64 px, b16
    assert layer((64, 64), 64, 64, 2, False) == "xla"
    assert models.describe_plan(models.conv_plan("vgg11", 32, width=1 / 16, train=True,
                                                 backend="cpu", batch=64)) == (
        "xla conv1_1-conv4_2, im2col conv5_1-conv5_2")
    assert models.describe_plan(models.conv_plan("vgg16", 32, train=True, backend="cpu",
                                                 batch=16)) == (
        "xla conv1_1, winograd conv1_2-conv3_1, winograd4 conv3_2-conv3_3, im2col "
        "conv4_1-conv5_3")
    plan = models.conv_plan("vgg16", 32, train=True, backend="cpu")
    assert models.describe_plan(plan) == ("xla conv1_1, winograd conv1_2-conv3_1, winograd4 "
                                          "conv3_2-conv3_3, winograd conv4_1-conv4_3, im2col "
                                          "conv5_1-conv5_3")
    plan = models.conv_plan("vgg16", 224, backend="cpu")
    assert models.describe_plan(plan) == "xla conv1_1-conv2_2, winograd conv3_1-conv5_3"
    assert models.conv_plan("C", 224, train=True, backend="cpu")["conv4_3"] == "im2col"  # 1x1
    # 28 -> 14 -> 7 -> 3 (floor) or 4 (ceil-mode pools): conv4_1 sees 9 or 16 pixels
    assert models.conv_plan("vgg16", 28, train=True, backend="cpu")["conv4_1"] == "im2col"
    assert models.conv_plan("vgg16", 28, train=True, backend="cpu",
                            pool_ceil=True)["conv4_1"] == "winograd"
    assert set(models.conv_plan("E", 224, train=True, backend="gpu").values()) == {"xla"}
    assert conv.resolve_conv_impl("winograd", "gpu") == "winograd"
    assert conv.resolve_conv_impl("winograd", "cpu", kernel=1) == "im2col"
    assert conv.resolve_conv_impl("winograd4", "cpu", kernel=1) == "im2col"
    assert conv.resolve_conv_impl("auto", "gpu", train=True) == "xla"
    assert conv.resolve_conv_impl("auto", "tpu", hw=(2, 2)) == "xla"
    assert conv.resolve_conv_impl("xla", "cpu", train=True) == "xla"
    assert conv.resolve_conv_impl("im2col", "gpu") == "im2col"
    assert conv.eval_compiler_options("gpu") is None
    assert "INDIVIDUAL_CONVOLUTION" in conv.eval_compiler_options("cpu")[
        "xla_cpu_experimental_ynn_fusion_type"]
    with pytest.raises(ValueError, match="unknown conv_impl 'fft'.*winograd"):
        conv.resolve_conv_impl("fft")


@pytest.mark.parametrize("impl", ["im2col", "winograd", "winograd4"])
def test_whole_model_is_the_same_with_any_conv(impl):
    """Config C has 1x1 convs too (winograd runs them as a matmul)."""
    m = models.create_model("C_bn", num_classes=4, width=1 / 16, fc_widths=(8, 8))
    v = models.init_variables(m, jax.random.key(0), 32)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    a = jax.jit(m.clone(conv_impl=impl).apply)(v, x)
    b = jax.jit(m.clone(conv_impl="xla").apply)(v, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def numpy_conv(x, k):
    """float64 'same' 3x3/1x1 correlation, written out: the reference no XLA option touches."""
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[1:3]
    return sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + w], k[i, j])
               for i in range(kh) for j in range(kw))


@pytest.mark.parametrize("impl", ["xla", "im2col", "winograd", "winograd4"])
def test_jitted_eval_convs_with_cpu_compiler_options_match_numpy(impl):
    """The YNNPACK options of jit_eval change which kernels run, not the result."""
    r = np.random.default_rng(7)
    x = r.normal(size=(2, 12, 10, 16)).astype(np.float32)
    k = (r.normal(size=(3, 3, 16, 24)) * 0.2).astype(np.float32)
    f = conv.jit_eval(lambda x, k: conv.conv2d(x, k, impl))
    np.testing.assert_allclose(np.asarray(f(x, k), np.float64),
                               numpy_conv(x.astype(np.float64), k.astype(np.float64)),
                               rtol=1e-4, atol=1e-4)


def test_auto_model_equals_the_all_xla_model_in_eval_and_training():
    """'auto' mixes implementations by layer (A at width 1/2, 64x64: in training at batch
    8 XLA's conv for conv1_1, F(2x2) from conv2_1's 32 inputs, F(4x4) at conv4_2's 8x8
    map with 256 inputs, im2col on conv5's 4x4 maps (128 pixels in the batch); in eval at
    batch 16 YNNPACK, F(2x2) and im2col): logits and the gradients of every parameter
    equal the all-'xla' model's."""
    m = models.create_model("A", num_classes=5, width=1 / 2, fc_widths=(8, 8), dropout_rate=0.0)
    plan = models.conv_plan("A", 64, width=1 / 2, train=True, backend="cpu", batch=8)
    assert (plan["conv1_1"], plan["conv2_1"], plan["conv4_2"], plan["conv5_1"]) == (
        "xla", "winograd", "winograd4", "im2col")
    plan = models.conv_plan("A", 64, width=1 / 2, backend="cpu", batch=16)
    assert {"xla", "winograd"} <= set(plan.values()), plan
    v = models.init_variables(m, jax.random.key(0), 64)
    x = jax.random.normal(jax.random.key(1), (16, 64, 64, 3))
    auto = conv.jit_eval(lambda v, x: m.apply(v, x))(v, x)
    ref = jax.jit(lambda v, x: m.clone(conv_impl="xla").apply(v, x))(v, x)
    np.testing.assert_allclose(auto, ref, rtol=1e-5, atol=1e-6)

    def loss(model):
        return jax.jit(jax.grad(
            lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x64, train=True)))))

    # in float64: in float32 a ReLU gate or a max-pool tie that rounding flips moves a
    # few kernel-gradient entries by ~1% between any two algorithms
    with jax.enable_x64(True):
        x64, p64 = x[:8].astype(jnp.float64), jax.tree.map(lambda a: a.astype(jnp.float64),
                                                        v["params"])
        m64 = m.clone(dtype=jnp.float64)
        for a, b in zip(jax.tree.leaves(loss(m64)(p64)),
                        jax.tree.leaves(loss(m64.clone(conv_impl="xla"))(p64))):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(jnp.abs(b).max()))


def test_auto_follows_the_platform_compiled_for_not_the_default_backend():
    """'auto' is resolved when lowering for a platform: the same jitted training forward
    lowered for CPU has XLA's conv only for the layers the CPU plan gives it (A at width
    1/4, batch 16: conv1_1 under 16 input channels, conv2_1, conv3_1, conv4_1 under 4M of
    work; the others are im2col or Winograd matmuls), lowered for CUDA (possible without a
    GPU) it has XLA's conv for each of A's 8 conv layers."""
    m = models.create_model("A", width=1 / 4, fc_widths=(16, 16), num_classes=10)
    v = models.init_variables(m, jax.random.PRNGKey(0), 32)
    x = jnp.zeros((16, 32, 32, 3))
    f = jax.jit(lambda v, x: m.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))
    traced = f.trace(v, x)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    plan = models.conv_plan("A", 32, width=1 / 4, train=True, backend="cpu", batch=16)
    assert [name for name, impl in plan.items() if impl == "xla"] == [
        "conv1_1", "conv2_1", "conv3_1", "conv4_1"]
    assert cpu.count("stablehlo.convolution") == 4
    assert cuda.count("stablehlo.convolution") == 8
