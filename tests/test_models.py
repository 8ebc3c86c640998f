"""The model zoo. Full-size models are only ever built abstractly (jax.eval_shape); models
that run use small widths and images because XLA's CPU convolutions are slow."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import models
from vgg_jax.models import abstract_variables, count_params, create_model, init_variables

LETTERS = ["A", "A-LRN", "B", "C", "D", "E"]


@pytest.mark.parametrize("arch,expected", [
    # Table 2 / torchvision exact counts at 1000 classes (../shared/PAPER.md).
    ("A", 132_863_336), ("A-LRN", 132_863_336), ("B", 133_047_848), ("C", 133_638_952),
    ("D", 138_357_544), ("E", 143_667_240),
    # torchvision vgg*_bn trainable parameters.
    ("vgg11_bn", 132_868_840), ("vgg13_bn", 133_053_736), ("vgg16_bn", 138_365_992),
    ("vgg19_bn", 143_678_248),
])
def test_parameter_counts_match_paper_and_torchvision(arch, expected):
    variables = abstract_variables(create_model(arch))
    assert count_params(variables["params"]) == expected


def test_bn_running_stats_are_two_numbers_per_conv_channel():
    variables = abstract_variables(create_model("vgg11_bn"))
    channels = 64 + 128 + 2 * 256 + 4 * 512
    assert count_params(variables["batch_stats"]) == 2 * channels


@pytest.mark.parametrize("alias,letter,bn", [
    ("vgg11", "A", False), ("vgg11_lrn", "A-LRN", False), ("vgg13_bn", "B", True),
    ("vgg16_c", "C", False), ("D_bn", "D", True), ("vgg19", "E", False), ("a-lrn", "A-LRN", False),
])
def test_paper_letters_and_torchvision_names_resolve(alias, letter, bn):
    assert models.resolve_arch(alias) == (letter, bn)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg17'.*A-LRN.*vgg16_bn"):
        create_model("vgg17")


@pytest.mark.parametrize("width", [0, -1, 100, "wide"])
def test_bad_width_is_a_clear_error(width):
    with pytest.raises(ValueError, match="width must be"):
        create_model("A", width=width)


def test_input_smaller_than_the_five_pools_is_a_clear_error():
    model = create_model("A", width=1 / 16, fc_widths=(8, 8), num_classes=3)
    with pytest.raises(ValueError, match=r"input 16x16 is smaller than 32x32"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))


def test_dense_input_smaller_than_224_is_a_clear_error():
    model = create_model("A", width=1 / 16, fc_widths=(8, 8), num_classes=3)
    variables = init_variables(model, jax.random.key(0), 32)
    with pytest.raises(ValueError, match=r"smaller than 224x224: dense"):
        model.apply(variables, jnp.zeros((1, 192, 224, 3)), dense=True)


def test_wrong_channel_count_is_a_clear_error():
    model = create_model("A", in_channels=1, width=1 / 16, fc_widths=(8, 8))
    variables = init_variables(model, jax.random.key(0), 32)
    with pytest.raises(ValueError, match="3 channels but the model was built for in_channels=1"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("arch", LETTERS + ["vgg16_bn"])
def test_full_size_output_shape_at_224(arch):
    model = create_model(arch)
    variables = abstract_variables(model)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.shape == (2, 1000) and out.dtype == jnp.float32


@pytest.mark.parametrize("arch", LETTERS + ["vgg13_bn"])
def test_small_width_runs_at_32(arch):
    model = create_model(arch, num_classes=10, width=1 / 16, fc_widths=(32, 32), in_channels=1)
    variables = init_variables(model, jax.random.key(0), 32)
    out = model.apply(variables, jnp.ones((3, 32, 32, 1)))
    assert out.shape == (3, 10) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("size,grid", [(224, 1), (256, 2), (384, 6)])
def test_dense_score_map_shape(size, grid):
    model = create_model("D")
    out = jax.eval_shape(lambda v, x: model.apply(v, x, dense=True), abstract_variables(model),
                         jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    # pool5 is size/32; a 7x7 VALID fc6 leaves size/32 - 6 positions.
    assert out.shape == (1, grid, grid, 1000)


@pytest.mark.parametrize("arch", ["A-LRN", "C", "vgg11_bn"])
def test_dense_equals_standard_at_224(arch):
    model = create_model(arch, num_classes=7, width=1 / 16, fc_widths=(16, 16))
    variables = init_variables(model, jax.random.key(1), 224)
    if "batch_stats" in variables:  # non-trivial running statistics
        variables = dict(variables, batch_stats=jax.tree.map(
            lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape),
            variables["batch_stats"]))
    x = jax.random.normal(jax.random.key(3), (2, 224, 224, 3))
    logits = model.apply(variables, x)
    scores = model.apply(variables, x, dense=True)
    assert scores.shape == (2, 1, 1, 7)
    np.testing.assert_allclose(scores[:, 0, 0], logits, rtol=1e-5, atol=1e-6)


def test_lrn_follows_alexnet_formula():
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 9)).astype(np.float32) * 30
    expected = np.empty_like(x)
    for c in range(9):  # b_c = a_c / (k + alpha * sum_{|j-c|<=2} a_j^2)^beta, no 1/n
        lo, hi = max(0, c - 2), min(9, c + 3)
        s = (x[..., lo:hi] ** 2).sum(-1)
        expected[..., c] = x[..., c] / (2.0 + 1e-4 * s) ** 0.75
    got = models.local_response_norm(jnp.asarray(x), **models.LRN_PARAMS)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("size", [1, 3, 7, 10, 13])
def test_adaptive_pool_matches_torch(size):
    import torch
    x = np.random.default_rng(size).normal(size=(2, size, size + 2, 5)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 7)
    got = models.adaptive_avg_pool(jnp.asarray(x), 7)
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 4), (2, 1, 5, 2)])
def test_max_pool_equals_flax_reduce_window_values_and_gradients(shape):
    """Odd sizes floor like torch's MaxPool2d(2, 2); random inputs have no ties, so the
    gradient goes to each window's argmax exactly as select-and-scatter sends it."""
    x = jnp.asarray(np.random.default_rng(sum(shape)).normal(size=shape), jnp.float32)
    ref = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731
    np.testing.assert_array_equal(models.max_pool(x), ref(x))
    w = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape), jnp.float32)
    g = jax.grad(lambda x, f: jnp.sum(w * f(x)), argnums=0)
    np.testing.assert_array_equal(g(x, models.max_pool), g(x, ref))


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 4)])
def test_fc6_with_the_pool_folded_in_equals_pool_then_dense(hw):
    """Maps smaller than the 7x7 grid: fc6(adaptive_avg_pool(x)) is computed with the pool
    folded into the kernel; the logits and every gradient equal pool-then-matmul."""
    x = jnp.asarray(np.random.default_rng(hw[0]).normal(size=(3, *hw, 4)), jnp.float32)
    pool = tuple(models.adaptive_pool_matrix(n, 7) for n in hw)
    fc = models.FC(5)
    v = fc.init(jax.random.key(0), x, pool=pool)
    v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
    assert v["params"]["kernel"].shape == (7 * 7 * 4, 5)

    def folded(v, x):
        return jnp.sum(jnp.sin(fc.apply(v, x, pool=pool)))

    def reference(v, x):
        flat = models.adaptive_avg_pool(x, 7).reshape(x.shape[0], -1)
        return jnp.sum(jnp.sin(flat @ v["params"]["kernel"] + v["params"]["bias"]))

    np.testing.assert_allclose(folded(v, x), reference(v, x), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(folded, argnums=(0, 1))(v, x)),
                    jax.tree.leaves(jax.grad(reference, argnums=(0, 1))(v, x))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_capture_returns_named_layers_and_fc8_is_the_logits():
    model = create_model("B", num_classes=5, width=1 / 16, fc_widths=(12, 12))
    variables = init_variables(model, jax.random.key(0), 64)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    acts = models.extract(model, variables, x, ["conv1_2", "conv3_2", "pool5", "fc7", "fc8"])
    assert acts["conv1_2"].shape == (2, 64, 64, 4)
    assert acts["conv3_2"].shape == (2, 16, 16, 16)
    assert acts["pool5"].shape == (2, 2, 2, 32)
    assert acts["fc7"].shape == (2, 12) and float(acts["fc7"].min()) >= 0  # after ReLU
    np.testing.assert_array_equal(acts["fc8"], model.apply(variables, x))


def test_capture_of_unknown_layer_names_valid_ones():
    model = create_model("A", width=1 / 16, fc_widths=(8, 8))
    variables = init_variables(model, jax.random.key(0), 32)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['conv5_4'\].*conv5_2"):
        models.extract(model, variables, jnp.zeros((1, 32, 32, 3)), ["conv5_4"])


def test_classifier_follows_relu_after_fc6_and_fc7():
    """A port once lost the ReLU after fc6; the logits must depend on it."""
    model = create_model("A", num_classes=3, width=1 / 16, fc_widths=(6, 6), dropout_rate=0.0)
    variables = init_variables(model, jax.random.key(4), 32)
    x = jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
    acts = models.extract(model, variables, x, ["pool5", "fc8"])
    p = variables["params"]
    h = np.asarray(acts["pool5"]).reshape(4, -1)  # 1x1 pool5 -> adaptive pool repeats it 7x7
    h = np.repeat(h[:, None, :], 49, axis=1).reshape(4, -1)
    for name in ("fc6", "fc7"):
        h = np.maximum(h @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"]), 0)
    logits = h @ np.asarray(p["fc8"]["kernel"]) + np.asarray(p["fc8"]["bias"])
    np.testing.assert_allclose(acts["fc8"], logits, rtol=1e-4, atol=1e-6)


def test_init_variables_draws_the_same_weights_inside_a_callers_jit():
    """init_variables runs its own jit (with init's compiler options) at top level and is
    traced into the caller's jit otherwise (train.py's state): the same draws either way,
    and different keys draw different weights. Small model (width 1/16, fc 16)."""
    model = create_model("A_bn", num_classes=5, width=1 / 16, fc_widths=(16, 16))
    key = jax.random.key(7)
    top = init_variables(model, key, 32)
    nested = jax.jit(lambda r: init_variables(model, r, 32))(key)
    for a, b in zip(jax.tree.leaves(top), jax.tree.leaves(nested)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = init_variables(model, jax.random.key(8), 32)
    assert not np.array_equal(np.asarray(top["params"]["conv1_1"]["kernel"]),
                              np.asarray(other["params"]["conv1_1"]["kernel"]))


@pytest.mark.parametrize("scheme,std", [("paper", 0.01), ("paper_literal", 0.1)])
def test_normal_init_schemes_have_documented_std(scheme, std):
    model = create_model("A", init_scheme=scheme, width=0.25, fc_widths=(256, 256))
    p = init_variables(model, jax.random.key(0), 32)["params"]
    for name in ("conv4_1", "fc6"):
        k = np.asarray(p[name]["kernel"])
        assert abs(k.std() - std) < 0.05 * std and abs(k.mean()) < 0.05 * std
        assert not np.asarray(p[name]["bias"]).any()


def test_kaiming_init_is_he_fan_out_for_convs():
    model = create_model("A", init_scheme="kaiming", width=0.25, fc_widths=(64, 64))
    k = np.asarray(init_variables(model, jax.random.key(0), 32)["params"]["conv4_1"]["kernel"])
    fan_out = 3 * 3 * k.shape[-1]
    assert abs(k.std() / np.sqrt(2 / fan_out) - 1) < 0.05


def test_he_init_is_he_fan_in_for_convs_and_fc_layers():
    model = create_model("A", init_scheme="he", width=0.25, fc_widths=(64, 64))
    p = init_variables(model, jax.random.key(0), 32)["params"]
    for name in ("conv4_1", "fc6", "fc7"):
        k = np.asarray(p[name]["kernel"])
        fan_in = int(np.prod(k.shape[:-1]))  # 3 x 3 x Cin for a conv, the rows for an fc
        assert abs(k.std() / np.sqrt(2 / fan_in) - 1) < 0.05 and abs(k.mean()) < 0.05 * k.std()


def test_torch_bias_init_matches_pytorchs_own_layers():
    """bias_init='torch': each layer's biases spread over PyTorch's default interval for the
    same layer, the bound taken from torch's own nn.Conv2d / nn.Linear (their weights'
    fan-in), d2l's grayscale conv1_1 (fan-in 9: +-1/3) included."""
    torch = pytest.importorskip("torch")
    model = create_model("vgg11", in_channels=1, width=0.25, fc_widths=(256, 256),
                         classifier_pool=2, bias_init="torch", num_classes=10)
    p = init_variables(model, jax.random.key(0), 64)["params"]
    torch.manual_seed(0)
    for name, layer in (("conv1_1", torch.nn.Conv2d(1, 16, 3)),
                        ("conv4_2", torch.nn.Conv2d(128, 128, 3)),
                        ("fc6", torch.nn.Linear(128 * 2 * 2, 256)),
                        ("fc8", torch.nn.Linear(256, 10))):
        fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = 1 / np.sqrt(fan_in)
        ours, theirs = np.asarray(p[name]["bias"]), layer.bias.detach().numpy()
        assert ours.shape == theirs.shape
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
        if ours.size >= 100:  # a uniform on [-b, b]: std b / sqrt(3)
            assert abs(ours.std() / (bound / np.sqrt(3)) - 1) < 0.1
        assert np.abs(ours).max() > 0.7 * bound  # spread, not zeros
    zeros = init_variables(create_model("vgg11", in_channels=1, width=0.25, fc_widths=(64, 64)),
                           jax.random.key(0), 32)["params"]
    assert not any(np.asarray(v["bias"]).any() for v in zeros.values())
    with pytest.raises(ValueError, match="unknown bias init 'ones'; choose one of zeros, torch"):
        create_model("A", bias_init="ones")


def test_unknown_init_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'; choose one of paper"):
        create_model("A", init_scheme="xavier")


def test_bf16_compute_keeps_float32_params():
    model = create_model("A_bn", dtype=jnp.bfloat16, width=1 / 16, fc_widths=(8, 8))
    variables = init_variables(model, jax.random.key(0), 32)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = model.apply(variables, jnp.ones((1, 32, 32, 3)))
    assert out.dtype == jnp.float32
    assert model.apply(variables, jnp.ones((1, 32, 32, 3)), capture=("conv2_1",),
                       mutable=["intermediates"])[1]["intermediates"]["layers"][0][
        "conv2_1"].dtype == jnp.bfloat16


def test_train_mode_updates_batch_stats_and_needs_dropout_rng():
    model = create_model("A_bn", num_classes=4, width=1 / 16, fc_widths=(8, 8))
    variables = init_variables(model, jax.random.key(0), 32)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) + 2.0
    _, state = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)},
                           mutable=["batch_stats"])
    old, new = variables["batch_stats"]["bn1_1"]["mean"], state["batch_stats"]["bn1_1"]["mean"]
    assert not np.allclose(old, new)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("scheme", ["paper", "glorot"])
def test_fc_kernels_drawn_in_blocks_keep_the_scheme_distribution(scheme):
    """fc6 (25088 x 256 here) is drawn in 14 blocks of 1792 rows: the values must still be
    i.i.d. with the scheme's law: N(0, 0.01^2), or U(+-sqrt(6 / (fan_in + fan_out)))."""
    import jax
    _, fc_init = models.initializers(scheme)
    k = np.asarray(fc_init(jax.random.PRNGKey(0), (25088, 256)))
    n = k.size
    if scheme == "paper":
        # the sample std of n normals is within 5 standard errors (0.01 / sqrt(2n))
        assert abs(k.std() - 0.01) < 5 * 0.01 / np.sqrt(2 * n)
    else:
        limit = np.sqrt(6 / (25088 + 256))
        assert k.min() >= -limit and k.max() <= limit
        # a uniform's std is limit / sqrt(3), its sample std within 5 standard errors
        assert abs(k.std() - limit / np.sqrt(3)) < 5 * limit / np.sqrt(3) / np.sqrt(n) * 2
    blocks = k.reshape(14, 1792, 256)
    assert not np.allclose(blocks[0], blocks[1])  # every block has its own key
    assert abs(np.corrcoef(blocks[0].ravel(), blocks[1].ravel())[0, 1]) < 5 / np.sqrt(1792 * 256)
