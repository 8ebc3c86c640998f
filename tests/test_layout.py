"""The package's shape (issue 19): one owner per idea, small modules, every command-line
option reaching the function it is for, user mistakes vs bugs."""
import ast
import glob
import importlib
import inspect
import os

import pytest

from conftest import ROOT
from vgg_jax import choices, cli, errors

MODULES = sorted(glob.glob(os.path.join(ROOT, "vgg_jax", "*.py")))
USES_A_TRAINED_NET = ("predict", "evaluate", "embed", "saliency", "plots", "convert_cmd")


def imports_of(path):
    """(module names imported from vgg_jax, names imported that start with '_')."""
    tree = ast.parse(open(path).read())
    mods, private = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vgg_jax"):
            sub = node.module.split(".")[1:] or [a.name for a in node.names]
            mods.update(sub[:1] if node.module != "vgg_jax" else [a.name for a in node.names])
            private.update(a.name for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("vgg_jax."):
                    mods.add(a.name.split(".")[1])
    return mods, private


def test_no_module_is_over_450_lines():
    sizes = {os.path.basename(p): sum(1 for _ in open(p)) for p in MODULES}
    assert max(sizes.values()) <= 450, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_modules_that_use_a_trained_net_import_neither_train_nor_private_helpers():
    for name in USES_A_TRAINED_NET:
        mods, private = imports_of(os.path.join(ROOT, "vgg_jax", f"{name}.py"))
        assert "train" not in mods, name
        assert not private, (name, private)


def test_no_import_cycles():
    graph = {os.path.basename(p)[:-3]: imports_of(p)[0] for p in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for n in graph.get(m, ()):
            if n in graph and n != m:
                visit(n, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


def subcommands():
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for add in (cli._summary, cli._convert, cli._predict, cli._features, cli._prepare,
                cli._stats, cli._evaluate, cli._embed, cli._transfer, cli._plot_embeddings,
                cli._activations,
                cli._saliency, cli._plot_metrics):
        add(sub)
    return sub.choices


def test_every_cli_option_is_a_parameter_of_its_function_and_back():
    """An option parsed and then dropped (how `evaluate --crop` went dead) cannot exist:
    each sub-command's options are exactly its function's keyword parameters."""
    for name, p in subcommands().items():
        dests = {a.dest for a in p._actions if a.dest not in ("help", "run")}
        module, function = p.get_default("run").split(":")
        params = set(inspect.signature(getattr(importlib.import_module(module), function)
                                       ).parameters)
        assert dests == params, (name, dests ^ params)


def test_cli_choices_are_the_listed_values():
    evaluate = subcommands()["evaluate"]
    protocol = next(a for a in evaluate._actions if a.dest == "protocol")
    assert tuple(protocol.choices) == choices.PROTOCOLS
    from vgg_jax import preprocess, views
    assert views.PROTOCOLS is choices.PROTOCOLS
    assert tuple(preprocess.NORMALIZATIONS) == choices.NORMALIZATIONS


def test_a_user_mistake_is_one_line_and_exit_2_but_a_bug_keeps_its_traceback(capsys, monkeypatch):
    assert cli.main(["summary", "vgg17"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vgg-jax summary: error: unknown architecture 'vgg17'")
    assert "\n" not in err
    from vgg_jax import summary

    def buggy(**kwargs):
        return {}["missing"]  # a programming error, not the user's

    monkeypatch.setattr(summary, "main", buggy)
    with pytest.raises(KeyError):
        cli.main(["summary", "vgg16"])


def test_check_choice_names_the_key_the_values_and_the_closest():
    with pytest.raises(errors.UserError) as e:
        errors.check_choice("eval.protocol", "multi-crop", choices.PROTOCOLS)
    msg = str(e.value)
    assert msg.startswith("unknown eval.protocol 'multi-crop'; choose one of")
    assert "(did you mean 'multicrop'" in msg
    assert "center, dense, multicrop, dense+multicrop" in msg


def test_config_lists_are_tuples_and_accept_the_comma_form(config):
    from vgg_jax import weights
    assert isinstance(config.eval.scales, tuple) and isinstance(config.train.init_exclude, tuple)
    for key in ("coordinator_address", "num_processes", "process_id"):
        assert key in config.train  # declared, so overrides are type-checked
    # what --config.train.init_exclude=fc8,fc7 gives (ml_collections keeps one string)
    assert weights.names(("fc8,fc7",)) == ("fc8", "fc7") == weights.names("fc8, fc7")
    assert weights.names(("fc8", "fc7")) == ("fc8", "fc7") and weights.names(()) == ()


def test_importing_the_package_for_models_loads_neither_tensorflow_nor_torch():
    """Research code that builds and runs models imports `vgg_jax` alone: TensorFlow (~4 s
    to import) loads only with what needs it, `vgg_jax.pretrained` included."""
    import subprocess
    import sys
    code = ("import sys, vgg_jax; loaded = [m for m in ('tensorflow', 'torch') if m in "
            "sys.modules]; from vgg_jax import pretrained; "
            "print(loaded, pretrained is vgg_jax.pretrained, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "True", "True"], out.stdout
    with pytest.raises(AttributeError, match="no attribute 'pretrained_weights'"):
        import vgg_jax
        vgg_jax.pretrained_weights
