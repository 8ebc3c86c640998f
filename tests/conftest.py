import importlib.util
import os
import sys
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The commands the tests start share one persistent compile cache, away from ~/.cache.
os.environ.setdefault("VGG_JAX_COMPILE_CACHE",
                      os.path.join(tempfile.gettempdir(), "vgg_jax_test_compile_cache"))
# The suite's own process runs the library in-process as the commands do: with the
# XLA:CPU options `vgg-jax` and train.py set (the import alone sets none; test_runtime.py
# checks that in fresh processes with a clean environment).
import vgg_jax  # noqa: E402

vgg_jax.configure_cpu()


def load_config(name="default", arg=None):
    """configs/NAME.py's get_config([arg]); ROOT is on sys.path while it loads, for the
    configs that build on `configs.default`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(ROOT)
    return module.get_config() if arg is None else module.get_config(arg)


def import_torchvision():
    """The real torchvision (0.28.0, the [test] extra). PyPI's wheel is built against CUDA
    torch: beside the CPU build of torch its C extension (detection ops: nms, roi_align)
    cannot load, and its import then fails registering fake kernels for those ops. The
    models, weights enums and transforms the tests use are pure Python: on that failure the
    import is retried with the fake-kernel registration skipped."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        register_fake = torch.library.register_fake
        torch.library.register_fake = lambda *args, **kwargs: (lambda f: f)
        try:
            import torchvision
        finally:
            torch.library.register_fake = register_fake
    return torchvision


def write_image_folder(root, classes=("cat", "dog"), per_class=5, size=(40, 52), seed=0,
                       formats=("jpg", "png")):
    """root/class/*.jpg|png with random pixels; returns the list of paths written."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            h, w = size
            arr = rng.integers(0, 256, (h + i, w, 3), dtype=np.uint8)
            p = os.path.join(root, c, f"{i}.{formats[i % len(formats)]}")
            Image.fromarray(arr).save(p)
            paths.append(p)
    return paths


@pytest.fixture
def config():
    return load_config()


def pytest_sessionfinish(session, exitstatus):
    """A skipped test fails the run: every test here runs on a CPU machine with the
    declared test dependencies, so a skip means a broken install or a broken test."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        names = ", ".join(r.nodeid for r in skipped[:5])
        print(f"\n{len(skipped)} test(s) skipped ({names}): the suite fails on any skip",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
