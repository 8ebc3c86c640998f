"""Keras and ONNX weights (issue 17), each checked against the framework that reads them
natively on this machine: Keras 3 (with TensorFlow) and onnxruntime. The Keras nets with
their head are full size (Keras fixes 224x224 and fc6's 25088 inputs); the rest is small."""
import os
import re

import keras  # declared test dependencies: a broken install fails, never skips
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import ROOT
from vgg_jax import cli, convert, importers, models, weights
from vgg_jax.errors import UserError



def randomize(model, seed=0):
    """Non-trivial weights (He-scaled kernels, random biases) so the logits mean something."""
    rng = np.random.default_rng(seed)
    new = []
    for w in model.get_weights():
        if w.ndim > 1:
            new.append(rng.normal(size=w.shape) * np.sqrt(2.0 / np.prod(w.shape[:-1])))
        else:
            new.append(rng.normal(size=w.shape) * 0.1)
    model.set_weights([w.astype(np.float32) for w in new])
    return model


def images(n, size, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def keras_reference(model, x, module):
    return model.predict(module.preprocess_input(x.astype(np.float32)), verbose=0)


def ours(path, tmp_path, arch, include_top, x):
    """Convert through the CLI, as a user would, and run the weights directory."""
    out = str(tmp_path / f"w_{os.path.basename(path)}")
    args = ["convert", "--arch", arch, "--from-keras", path, "--out", out]
    assert cli.main(args + ([] if include_top else ["--no-top"])) == 0
    net = weights.Net(out)
    assert net.meta["preprocessing"]["bgr"] and net.meta["preprocessing"]["convention"] == "caffe"
    return np.asarray(net.logits(x))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name, arch, formats", [("VGG16", "vgg16", ("h5", "keras")),
                                                 ("VGG19", "vgg19", ("keras",))])
def test_keras_with_head_matches_keras_predict(tmp_path, name, arch, formats):
    module = getattr(keras.applications, name.lower())
    model = randomize(getattr(keras.applications, name)(weights=None, classes=10,
                                                          classifier_activation=None))
    x = images(2, 224)
    ref = keras_reference(model, x, module)
    for ext in formats:
        path = str(tmp_path / f"{name}.{ext}")
        model.save(path)
        got = ours(path, tmp_path, arch, True, x)
        assert got.shape == (2, 10) and rel_err(got, ref) <= 1e-4, (ext, rel_err(got, ref))


@pytest.mark.parametrize("name, arch", [("VGG16", "vgg16"), ("VGG19", "vgg19")])
def test_keras_notop_matches_keras_notop_and_is_a_backbone(tmp_path, name, arch):
    module = getattr(keras.applications, name.lower())
    model = randomize(getattr(keras.applications, name)(weights=None, include_top=False,
                                                          input_shape=(64, 64, 3)), seed=2)
    x = images(2, 64)
    ref = keras_reference(model, x, module)
    path = str(tmp_path / f"{name}_notop.h5")
    model.save(path)
    got = ours(path, tmp_path, arch, False, x)
    assert got.shape == ref.shape == (2, 2, 2, 512) and rel_err(got, ref) <= 1e-4
    # a backbone: extract works, and fine-tuning loads every conv with a new head
    variables, meta = weights.load_weights(str(tmp_path / f"w_{name}_notop.h5"))
    assert not meta["model"]["include_top"] and "fc6" not in variables["params"]
    import jax
    head = models.create_model(arch, num_classes=3, fc_widths=(8, 8), classifier_pool=1)
    fresh = models.init_variables(head, jax.random.key(0), 64)["params"]
    params, _, loaded = weights.load_layers(fresh, {}, variables, list(variables["params"]))
    assert loaded == [l.name for l in models.layer_table(arch) if l.kind == "conv"]
    assert head.apply({"params": params}, x.astype(np.float32)).shape == (2, 3)


def test_wrong_keras_files_name_the_first_layer_that_does_not_fit(tmp_path):
    vgg19 = keras.applications.VGG19(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg19.h5")
    vgg19.save(path)
    with pytest.raises(UserError, match=r"'block3_conv4' has kernel \(3, 3, 256, 256\).*"
                                        r"vgg16's conv4_1 needs \(3, 3, 256, 512\)"):
        importers.from_keras(path, "vgg16", include_top=False)
    vgg16 = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    vgg16.save(str(tmp_path / "vgg16.h5"))
    with pytest.raises(UserError, match=r"'block4_conv1' has kernel \(3, 3, 256, 512\).*"
                                        r"vgg19's conv3_4 needs \(3, 3, 256, 256\)"):
        importers.from_keras(str(tmp_path / "vgg16.h5"), "vgg19", include_top=False)
    with open(path, "rb") as f:
        head = f.read(4096)
    with open(tmp_path / "truncated.h5", "wb") as f:
        f.write(head)
    assert cli.main(["convert", "--arch", "vgg19", "--from-keras", str(tmp_path / "truncated.h5"),
                     "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(UserError, match="cannot read .*truncated.h5 as a Keras file"):
        importers.from_keras(str(tmp_path / "truncated.h5"), "vgg19")




def export_onnx(module, path, size, fold=True):
    """fold=False keeps BatchNormalization nodes (constant folding merges them into the
    convs)."""
    torch.onnx.export(module, torch.zeros(1, 3, size, size), path, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      dynamo=False, do_constant_folding=fold)


@pytest.mark.parametrize("arch, bn", [("vgg11", False), ("vgg11_bn", True)])
def test_onnx_export_of_a_torchvision_vgg_matches_onnxruntime(tmp_path, arch, bn):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torchvision_vgg import VGG, randomize as torch_randomize
    net = torch_randomize(VGG("vgg11", batch_norm=bn, num_classes=7, width=1 / 16, fc=32))
    path = str(tmp_path / f"{arch}.onnx")
    export_onnx(net, path, 224)
    x = images(2, 224)
    normalised = (x - np.asarray([123.675, 116.28, 103.53])) / np.asarray([58.395, 57.12, 57.375])
    ref = ort.InferenceSession(path).run(None, {"x": normalised.transpose(0, 3, 1, 2).astype(
        np.float32)})[0]
    out = str(tmp_path / "w")
    assert cli.main(["convert", "--arch", arch, "--from-onnx", path, "--out", out]) == 0
    got = np.asarray(weights.Net(out).logits(x))
    assert got.shape == (2, 7) and rel_err(got, ref) <= 1e-4, rel_err(got, ref)


def test_onnx_batch_norm_nodes_are_converted_or_refused_never_dropped(tmp_path):
    """A graph that keeps its BatchNormalization nodes: converted as vgg11_bn it matches
    onnxruntime; asked as vgg11 (no BN) it is refused, naming the count; a BN node whose
    arrays do not fit the conv before it is refused naming the node and both shapes."""
    import sys

    import onnx
    from onnx import numpy_helper
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torchvision_vgg import VGG, randomize as torch_randomize
    net = torch_randomize(VGG("vgg11", batch_norm=True, num_classes=7, width=1 / 16, fc=32))
    for m in net.modules():  # running statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path / "bn.onnx")
    export_onnx(net.eval(), path, 224, fold=False)
    graph = onnx.load(path).graph
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == 8
    x = images(2, 224)
    normalised = (x - np.asarray([123.675, 116.28, 103.53])) / np.asarray([58.395, 57.12, 57.375])
    ref = ort.InferenceSession(path).run(None, {"x": normalised.transpose(0, 3, 1, 2).astype(
        np.float32)})[0]
    out = str(tmp_path / "w")
    assert cli.main(["convert", "--arch", "vgg11_bn", "--from-onnx", path, "--out", out]) == 0
    assert rel_err(np.asarray(weights.Net(out).logits(x)), ref) <= 1e-4
    with pytest.raises(UserError, match="the graph has 8 BatchNormalization nodes, which vgg11 "
                                        "has no place for; convert it as vgg11_bn"):
        importers.from_onnx(path, "vgg11")
    model = onnx.load(path)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    for init in model.graph.initializer:
        if init.name == bn.input[3]:  # the first BN's running mean, one channel short
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:-1], init.name))
    onnx.save(model, str(tmp_path / "short.onnx"))
    with pytest.raises(UserError, match=r"BatchNormalization .* has mean \(3,\), but vgg11_bn's "
                                        r"bn1_1 needs \(4,\)"):
        importers.from_onnx(str(tmp_path / "short.onnx"), "vgg11_bn")


@pytest.mark.parametrize("op, attribute, value, message", [
    ("Conv", "strides", [2, 2], "strides [2, 2]"),
    ("Conv", "pads", [0, 0, 0, 0], "pads [0, 0, 0, 0]"),
    ("Conv", "dilations", [2, 2], "dilations [2, 2]"),
    ("Gemm", "alpha", 2.0, "alpha 2.0"),
    ("Gemm", "transA", 1, "transA 1")])
def test_onnx_nodes_that_compute_something_else_are_refused_by_name(tmp_path, op, attribute,
                                                                     value, message):
    """Same weight shapes, another function: an attribute VGG's layers never have."""
    import sys

    import onnx
    from onnx import helper
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torchvision_vgg import VGG
    path = str(tmp_path / "vgg.onnx")
    export_onnx(VGG("vgg11", num_classes=7, width=1 / 16, fc=32).eval(), path, 224)
    model = onnx.load(path)
    node = [n for n in model.graph.node if n.op_type == op][-1]
    kept = [a for a in node.attribute if a.name != attribute]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(attribute, value)])
    onnx.save(model, path)
    with pytest.raises(UserError, match=f"{op} node {node.name!r} has {re.escape(message)}: not a"):
        importers.from_onnx(path, "vgg11")


def test_onnx_graph_with_a_foreign_head_converts_as_a_backbone(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torchvision_vgg import VGG, randomize as torch_randomize
    base = torch_randomize(VGG("vgg11", num_classes=7, width=1 / 16, fc=32))

    class Custom(torch.nn.Module):  # a fine-tuned VGG with a head of its own
        def __init__(self):
            super().__init__()
            self.features = base.features
            self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                            torch.nn.Linear(32, 5))

        def forward(self, x):
            return self.head(self.features(x))

    full = str(tmp_path / "custom.onnx")
    export_onnx(Custom().eval(), full, 64)
    with pytest.raises(UserError, match=r"the head has 1 dense layers .*include_top=False"):
        importers.from_onnx(full, "vgg11")
    backbone = str(tmp_path / "backbone.onnx")
    export_onnx(base.features, backbone, 64)  # onnxruntime's pool5, to compare with
    x = images(2, 64)
    normalised = ((x - np.asarray([123.675, 116.28, 103.53])) /
                  np.asarray([58.395, 57.12, 57.375])).astype(np.float32)
    ref = ort.InferenceSession(backbone).run(None, {"x": normalised.transpose(0, 3, 1, 2)})[0]
    variables = convert.from_onnx(full, "vgg11", include_top=False)
    model = models.create_model("vgg11", width=1 / 16, include_top=False)
    got = np.asarray(model.apply(variables, normalised))
    assert rel_err(got, ref.transpose(0, 2, 3, 1)) <= 1e-4
    with open(tmp_path / "not_a_vgg.onnx", "wb") as f:
        f.write(b"definitely not protobuf")
    with pytest.raises(UserError, match="cannot read .*not_a_vgg.onnx as an ONNX model"):
        importers.from_onnx(str(tmp_path / "not_a_vgg.onnx"), "vgg11")
    export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5), torch.nn.ReLU()).eval(),
                str(tmp_path / "small.onnx"), 32)
    with pytest.raises(UserError, match=r"Conv node '/0/Conv' has a 5x5 kernel: not a VGG conv"):
        importers.from_onnx(str(tmp_path / "small.onnx"), "vgg11", include_top=False)


def test_torch_state_dict_with_a_foreign_head_converts_as_a_backbone(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torchvision_vgg import VGG, randomize as torch_randomize
    net = torch_randomize(VGG("vgg11", batch_norm=True, num_classes=7, width=1 / 16, fc=32))
    sd = dict(net.state_dict())
    sd["classifier.6.weight"] = torch.zeros(3, 99)  # a head that is not VGG's
    with pytest.raises(UserError, match="classifier.6.weight"):
        convert.from_torch(sd, "vgg11_bn")
    torch.save(sd, tmp_path / "ft.pth")
    out = str(tmp_path / "w")
    assert cli.main(["convert", "--arch", "vgg11_bn", "--from-torch", str(tmp_path / "ft.pth"),
                     "--no-top", "--out", out]) == 0
    variables, meta = weights.load_weights(out)
    assert not meta["model"]["include_top"] and "fc6" not in variables["params"]
    x = images(2, 64).astype(np.float32) / 255.0
    ref = net.features(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    got = np.asarray(weights.model_from_meta(meta).apply(variables, x))
    assert rel_err(got, ref.transpose(0, 2, 3, 1)) <= 1e-4
