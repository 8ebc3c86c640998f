import json
import subprocess
import sys

import pytest

from vgg_jax import summary


def test_receptive_fields_of_D_follow_the_formula():
    rf = summary.receptive_fields("D")
    # RF_n = RF_{n-1} + (k-1) * prod(strides): values worked by hand in the issue / seeds.
    assert {k: rf[k] for k in ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "pool5")} \
        == {"conv1_2": 5, "conv2_2": 14, "conv3_3": 40, "conv4_3": 92, "conv5_3": 196, "pool5": 212}


def test_three_stacked_3x3_convs_see_7x7():
    rf = summary.receptive_fields("E")
    assert rf["conv1_1"] == 3 and rf["conv1_2"] == 5


@pytest.mark.parametrize("arch,gmacs", [
    # torchvision's published "GFLOPS" (multiply-adds) at 224; C from PAPER.md.
    ("vgg11", 7.609), ("vgg13", 11.308), ("vgg16", 15.47), ("vgg19", 19.632), ("C", 11.771),
])
def test_multiply_adds_match_torchvision(arch, gmacs):
    s = summary.summarize(arch)
    assert round(s["macs"] / 1e9, 3) == pytest.approx(gmacs, abs=1e-3)
    assert s["flops"] == 2 * s["macs"]


def test_layer_rows_for_D():
    s = summary.summarize("D")
    rows = {r["name"]: r for r in s["layers"]}
    assert rows["conv1_1"]["shape"] == [224, 224, 64]
    assert rows["conv1_1"]["params"] == 3 * 3 * 3 * 64 + 64
    assert rows["conv1_1"]["activation_bytes"] == 224 * 224 * 64 * 4
    assert rows["fc6"]["params"] == 7 * 7 * 512 * 4096 + 4096
    assert rows["pool5"]["shape"] == [7, 7, 512]
    assert s["params"] == 138_357_544


def test_small_input_gets_an_adaptive_pool_row():
    s = summary.summarize("A", image_size=32, num_classes=10, width=0.25)
    names = [r["name"] for r in s["layers"]]
    assert names[-4:] == ["avgpool", "fc6", "fc7", "fc8"]


def test_cli_summary_json():
    out = subprocess.run([sys.executable, "-m", "vgg_jax.cli", "summary", "vgg16_bn", "--json",
                          "--num-classes", "10"], capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)
    assert {"params", "flops", "activation_bytes", "layers"} <= set(s)
    assert s["params"] == 138_365_992 - 4097 * 1000 + 4097 * 10


def test_cli_unknown_arch_exits_with_message():
    out = subprocess.run([sys.executable, "-m", "vgg_jax.cli", "summary", "vgg12"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown architecture 'vgg12'" in out.stderr


def test_a_table_that_disagrees_with_the_module_is_an_error_even_under_python_O(monkeypatch):
    from vgg_jax import models, summary
    monkeypatch.setattr(models, "count_params", lambda params: 1)
    with pytest.raises(RuntimeError, match="summary counts .* parameters for vgg11 but the "
                                           "module has 1"):
        summary.summarize("vgg11", image_size=32, width=1 / 16)
