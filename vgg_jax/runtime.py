"""How a vgg_jax command starts: quietly, with JAX's persistent compilation cache and,
by one explicit call, the XLA:CPU options the project measured.

None of this happens on `import vgg_jax`: a library must leave its user's process as it
found it. The entry points (`vgg-jax`, `train.py`), which own their process, call what
they want; a user's program may call the same.

Quiet: loading TensorFlow (the input pipeline's engine here) prints start-up banners from
C++ before any logging is set up (oneDNN, CPU features, absl's "before
absl::InitializeLog" warning), which no environment variable silences in TF 2.21. The
entry points import the modules that load TensorFlow inside `tensorflow_import()`, which
drops exactly those lines from stderr and passes every other line through.
`quiet_tensorflow()` sets TF_CPP_MIN_LOG_LEVEL=1 (INFO off later on) unless it is set.

Quick: TF 2.21's `import tensorflow` also imports Keras 3 whenever it is installed (TF
depends on it; it loads `keras.src.optimizers` eagerly, for SavedModels that name Keras
optimizers), and Keras imports scikit-learn for its wrappers: ~2.9 s of the ~6 s import
on a 2-core CPU, for nothing vgg_jax uses (tf.data, tf.image, TFDS). The same context
defers that load (`KerasDeferred`): TensorFlow imports without it, and `import keras` or
`tf.keras` later load Keras as usual (bench/RESULTS.md, 2026-11-30). The library's own
modules import TensorFlow plainly; only the entry points use the context.

CPU options (`configure_cpu()`): four XLA:CPU options in XLA_FLAGS (conv.CPU_PROCESS_OPTIONS:
YNNPACK convs, the classic fusion emitters, LLVM without loop unrolling and SLP
vectorizer, the memory-minimizing scheduler) and a listener that hands the memory XLA's
compiler frees back to the system (glibc's malloc_trim) after every compile of a second
or more: XLA:CPU's compiler (LLVM) frees its working memory when a compile ends, and
glibc keeps the freed pages in the process (~220 MB after VGG-16's 32x32 training step,
~390 MB at 224). The options the library's own jits need take effect per computation
without it (conv.train_compiler_options, eval_compiler_options); the scheduler and the
LLVM switches XLA takes only process-wide (bench/RESULTS.md).

Compile cache: the first run of a command compiles its steps (~35 s for the VGG-16 CPU
training step); JAX can keep the compiled programs on disk and reuse them when nothing
changed. The commands (`train.py`, `vgg-jax`) turn it on in config.train.compile_cache's
folder when the config sets one, else COMPILE_CACHE_ENV's, else ~/.cache/vgg_jax/jax
(XDG_CACHE_HOME respected); 'off' (in either) leaves it off.

Quick to end: at exit the interpreter's last garbage collection walks every object still
alive, and with TensorFlow loaded that is over a million of them: 1.2-1.4 s of every
command on a 2-core EPYC (2026-12-07). A command whose work is done and closed calls
`skip_exit_collection()` (gc.freeze: the live objects leave the collector's view); only
garbage already caught in reference cycles then goes unfinalised, which holds nothing the
commands write (files, checkpoints and event writers are closed before).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile

log = logging.getLogger(__name__)
COMPILE_CACHE_ENV = "VGG_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false")


BANNERS = re.compile(r"All log messages before absl::InitializeLog|port\.cc:\d+\] oneDNN custom "
                     r"operations are on|cpu_feature_guard\.cc|^To enable the following "
                     r"instructions:|rebuild TensorFlow with the appropriate compiler flags")


def quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


class KerasDeferred(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """While on sys.meta_path: `keras` (not yet imported) is found where it is installed
    (so TensorFlow's look-up of its folder works) but refuses to load, with the
    ImportError that TensorFlow's eager load of `keras.src.optimizers` passes over.
    Nothing of Keras is left in sys.modules, so once this is removed Keras imports whole."""

    def find_spec(self, name, path=None, target=None):
        found = (importlib.machinery.PathFinder.find_spec(name, path, target)
                 if name == "keras" else None)
        return found and importlib.machinery.ModuleSpec(name, self, origin=found.origin,
                                                        is_package=True)

    def exec_module(self, module):  # importlib then takes `keras` out of sys.modules again
        raise ImportError("keras is not loaded while TensorFlow imports (vgg_jax.runtime)")


@contextlib.contextmanager
def tensorflow_import():
    """Run the body (an `import tensorflow`) with file descriptor 2 captured and Keras'
    eager load deferred (`KerasDeferred`, when Keras is not imported yet); afterwards
    write back every captured line except TensorFlow's start-up banners (BANNERS)."""
    if "tensorflow" in sys.modules:  # loaded already: its banners are behind us
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    deferred = None if "keras" in sys.modules else KerasDeferred()
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        if deferred is not None:
            sys.meta_path.insert(0, deferred)
        try:
            yield
        finally:
            if deferred is not None:
                sys.meta_path.remove(deferred)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [l for l in capture.read().decode(errors="replace").splitlines(True)
                    if not BANNERS.search(l)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def absl_warnings_off():
    """Run the body with absl's logger (orbax, TFDS) at ERROR: for warnings a library
    gives about what the caller is finding out (a dataset not prepared yet, a checkpoint
    step without metadata), which the caller reports itself."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's
TRIM_MIN_COMPILE_S = 1.0  # malloc_trim takes ~25 ms: not after every small op's compile
_trim = {"libc": None}  # the C library, once the listener is installed


def _trim_after(event: str, seconds: float, **_) -> None:
    if event == BACKEND_COMPILE_EVENT and seconds >= TRIM_MIN_COMPILE_S:
        _trim["libc"].malloc_trim(0)


def trim_heap_after_compiles() -> bool:
    """After every XLA compile of >= TRIM_MIN_COMPILE_S seconds, return the heap's free pages
    to the system (glibc's malloc_trim(0)); see the module doc. A jax.monitoring listener,
    installed once (by `configure_cpu`); on a C library without malloc_trim (musl, macOS)
    nothing is installed. Returns whether it is installed."""
    if _trim["libc"] is None:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library's among them
        if not hasattr(libc, "malloc_trim"):
            return False
        import jax.monitoring
        _trim["libc"] = libc
        jax.monitoring.register_event_duration_secs_listener(_trim_after)
    return True


def configure_cpu() -> bool:
    """The process-wide XLA:CPU choices the vgg-jax commands run with (an opt-in; nothing
    calls it on import). It changes the process:
    - XLA_FLAGS gains conv.CPU_PROCESS_OPTIONS, each unless already set there (and none
      with $VGG_JAX_KEEP_XLA_FLAGS): YNNPACK convs and dots, so a plain
      `jax.jit(model.apply)` gets the fast CPU inference convs; the classic fusion
      emitters (a VGG training step compiles with ~1 GB less memory, runs ~8% faster);
      LLVM without loop unrolling and SLP vectorizer (a quarter of the compile time);
      XLA:CPU's memory-minimizing scheduler (17-21% fewer temporaries). XLA reads them
      when JAX starts its CPU backend: call this before any JAX computation.
    - a jax.monitoring listener returns the compiler's freed memory to the system after
      every compile of a second or more (`trim_heap_after_compiles`).
    GPUs and TPUs ignore both. Returns whether XLA_FLAGS changed."""
    from vgg_jax import conv
    changed = conv.set_default_xla_flags()
    trim_heap_after_compiles()
    return changed


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vgg_jax", "jax")


def compile_cache_dir(configured: str = "") -> str | None:
    """The folder the persistent compile cache uses, or None when it is turned off: a value
    set in the config (explicit) wins over the environment variable, which wins over the
    default."""
    choice = configured or os.environ.get(COMPILE_CACHE_ENV) or default_cache_dir()
    return None if choice.strip().lower() in OFF else os.path.abspath(os.path.expanduser(choice))


def skip_exit_collection() -> None:
    """The end of a command that finished its work: no last garbage collection of every
    live object at exit (module doc)."""
    import gc
    gc.freeze()


def enable_compile_cache(configured: str = "") -> str | None:
    """Turn JAX's persistent compilation cache on (see module doc); returns its folder."""
    import jax
    path = compile_cache_dir(configured)
    if path is None:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # cache every program that took a while to compile, however small it is on disk
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.debug("persistent compilation cache in %s", path)
    return path
