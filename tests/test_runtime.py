"""A library in someone else's process (issue 47): importing vgg_jax changes nothing; the
process-wide XLA:CPU choices are one explicit call, `vgg_jax.configure_cpu()`."""
import json
import subprocess
import sys

from conftest import ROOT, user_env

# Snapshot what a library could change, after the third-party packages vgg_jax uses are
# imported (what TensorFlow's own import does is TensorFlow's), then after every module of
# vgg_jax, and print both.
SNAPSHOT = r"""
import importlib, json, logging, os, pkgutil, sys, threading
def snap():
    from jax._src import monitoring
    st = os.fstat(2)
    return dict(env=dict(os.environ), meta_path=[repr(f) for f in sys.meta_path],
                excepthook=repr(sys.excepthook), thread_hook=repr(threading.excepthook),
                unraisable=repr(sys.unraisablehook), stderr_fd=[st.st_dev, st.st_ino],
                root_handlers=[repr(h) for h in logging.getLogger().handlers],
                root_level=logging.getLogger().level,
                listeners=[len(monitoring.get_event_listeners()),
                           len(monitoring.get_event_duration_listeners()),
                           len(monitoring.get_event_time_span_listeners()),
                           len(monitoring.get_scalar_listeners())])
for dep in ("jax", "flax.linen", "optax", "orbax.checkpoint", "tensorflow",
            "tensorflow_datasets", "sklearn.svm", "matplotlib", "PIL.Image", "ml_collections",
            "tqdm", "numpy"):
    importlib.import_module(dep)
before = snap()
import vgg_jax
names = [m.name for m in pkgutil.walk_packages(vgg_jax.__path__, "vgg_jax.")]
for name in names:
    importlib.import_module(name)
after = snap()
if sys.argv[1:] == ["configure"]:
    vgg_jax.configure_cpu()
    after = snap()
print(json.dumps(dict(before=before, after=after, modules=names)))
"""


def run_snapshot(*args):
    r = subprocess.run([sys.executable, "-c", SNAPSHOT, *args], cwd=ROOT, env=user_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_importing_every_module_leaves_the_process_as_it_found_it():
    r = run_snapshot()
    assert len(r["modules"]) >= 30 and "vgg_jax.cli" in r["modules"]
    before, after = r["before"], r["after"]
    assert "XLA_FLAGS" not in after["env"]
    for key in before:
        assert after[key] == before[key], (key, before[key], after[key])


def test_configure_cpu_is_the_one_call_that_sets_the_process_wide_options():
    r = run_snapshot("configure")
    before, after = r["before"], r["after"]
    flags = after["env"]["XLA_FLAGS"]
    for option in ("--xla_cpu_use_fusion_emitters=false", "xla_cpu_disable_loop_unrolling",
                   "--xla_cpu_enable_concurrency_optimized_scheduler=false",
                   "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"):
        assert option in flags, flags
    # the heap-trim listener, a duration listener, and nothing else
    assert after["listeners"][1] == before["listeners"][1] + 1
    assert after["listeners"][0::2] == before["listeners"][0::2]
    changed = {k for k in before if k != "env" and after[k] != before[k]}
    assert changed == {"listeners"}, changed


# A user's own convolution, forward and gradient, compiled; the executable's text without
# source locations (the only part that names the script's lines).
USER_JIT = r"""
import re, sys
if sys.argv[1] == "with":
    import vgg_jax, vgg_jax.train, vgg_jax.weights  # noqa: F401 (the import under test)
import jax, jax.numpy as jnp

def f(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) ** 2)

x = jax.ShapeDtypeStruct((4, 16, 16, 8), jnp.float32)
k = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)
texts = [jax.jit(g).lower(x, k).compile().as_text() for g in (f, jax.grad(f, (0, 1)))]
print(re.sub(r",? ?metadata=\{[^}]*\}", "", "\n".join(texts)))
"""


def test_a_users_own_jit_compiles_to_the_same_executable_with_and_without_the_import():
    def compiled(mode):
        r = subprocess.run([sys.executable, "-c", USER_JIT, mode], cwd=ROOT, env=user_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    without, with_import = compiled("without"), compiled("with")
    assert "convolution" in without or "conv" in without
    assert with_import == without


def test_the_console_command_skips_the_exit_collection_and_main_in_process_does_not():
    """`vgg-jax` (cli.entry) freezes the collector's objects once its work has returned,
    so the interpreter's exit does not walk TensorFlow's million objects; cli.main, which
    a user's program may call, leaves the collector as it was."""
    code = """
import gc, sys
from vgg_jax import cli
rc = cli.main(["published"])
print(rc, gc.get_freeze_count())
rc = cli.entry()
print(rc, gc.get_freeze_count() > 10_000)
"""
    r = subprocess.run([sys.executable, "-c", code, "published"], cwd=ROOT, env=user_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert "0 0" in lines and lines[-1] == "0 True", r.stdout[-2000:]
    assert lines.index("0 0") < len(lines) - 1
