"""Trustworthy runs (issue 15): a corrupted checkpoint, two runs on one workdir, config
mistakes, image-folder splits, a quiet start, the compile cache, the heap after a
compile, kills at random moments.
Runs are tiny (width 1/16 VGG-11-BN, 32x32 digits) and happen in subprocesses, as a user
starts them."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_image_folder
from vgg_jax import errors, input_pipeline, lease

TINY = ["--config.model.width=0.0625", "--config.model.fc_widths=(16, 16)",
        "--config.optim.batch_size=32", "--config.train.progress_bar=False",
        "--config.optim.warmup_epochs=0", "--config.optim.schedule=constant",
        "--config.train.eval_every_epochs=1000", "--config.train.checkpoint_every_steps=4",
        "--config.model.conv_impl=xla"]  # compiles faster than Winograd (test_pods.py)


def run_train(workdir, *flags, **kw):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *TINY, *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def truncate_arrays(step_dir):
    """What a full disk leaves: every array file of the step cut to 10 bytes."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
    assert files
    for f in files:
        os.truncate(f, 10)


def test_a_corrupted_latest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path):
    w = tmp_path / "w"
    first = run_train(w, "--config.train.max_steps=8")
    assert first.returncode == 0, first.stderr[-2000:]
    truncate_arrays(w / "checkpoints" / "8")
    again = run_train(w, "--config.train.max_steps=12")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    warning = [l for l in again.stderr.splitlines() if "cannot be read" in l]
    assert len(warning) == 1 and "checkpoint step 8" in warning[0]
    assert f"moved to {w / 'checkpoints' / '8.corrupt'}" in warning[0]
    assert "resuming from step 4" in warning[0]
    assert sorted(os.listdir(w / "checkpoints")) == ["12", "8", "8.corrupt"]  # kept, not deleted
    # nothing readable: one line naming every step tried, and nothing moved
    for step in ("8", "12"):
        truncate_arrays(w / "checkpoints" / step)
    none = run_train(w, "--config.train.max_steps=16")
    assert none.returncode == 2 and "Traceback" not in none.stderr
    [line] = [l for l in none.stderr.splitlines() if l.startswith("train.py: error:")]
    assert "no checkpoint in" in line and "step 12:" in line and "step 8:" in line
    assert sorted(os.listdir(w / "checkpoints")) == ["12", "8", "8.corrupt"]


def test_a_second_run_on_a_workdir_refuses_and_a_killed_holder_does_not_block(tmp_path):
    w = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vgg_jax.lease import WorkdirLock; "
         "held = WorkdirLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(w)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_train(w, "--config.train.max_steps=4")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert (f"train.py: error: workdir {w} is in use by process {holder.pid}"
                in second.stderr)
        assert not (w / "checkpoints").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    lock = lease.WorkdirLock(str(w))  # the kernel released the SIGKILLed holder's lock
    with pytest.raises(errors.UserError, match="is in use by process"):
        lease.WorkdirLock(str(w))  # (flock is per open file, so this one is refused)
    lock.release()
    lease.WorkdirLock(str(w)).release()


@pytest.mark.parametrize("flag, expected", [
    ("--config.optim.batch_size=0", "optim.batch_size=0 is out of range: it must be >= 1"),
    ("--config.optim.batch_size=-5", "optim.batch_size=-5 is out of range: it must be >= 1"),
    ("--config.optim.lr_typo=1", "unknown config key 'optim.lr_typo': optim has batch_size,"),
    ("--config.optim.learnin_rate=0.1",
     "unknown config key 'optim.learnin_rate': did you mean optim.learning_rate?"),
    ("--config.eval.protocol=tencrop", "unknown eval.protocol 'tencrop'; choose one of center,"),
    ("--config.optim.batch_size=abc", "--config.optim.batch_size=abc: invalid literal for int()"),
    ("--config=configs/nope.py", "config file configs/nope.py not found"),
])
def test_config_mistakes_are_one_line_with_exit_status_2(tmp_path, flag, expected):
    out = run_train(tmp_path / "w", flag)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), out.stderr
    assert expected in lines[0]


def test_vgg_jax_usage_errors_are_one_line_with_exit_status_2(tmp_path):
    out = subprocess.run(["vgg-jax", "predict", "--weights", str(tmp_path / "none"), "x.jpg"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"vgg-jax predict: error: {tmp_path / 'none'} is neither a weights directory "
        f"(meta.json + variables/, written by `vgg-jax convert` or training) nor a training "
        f"workdir (checkpoints/)"]


def test_image_folder_splits_are_found_whatever_eval_split_says(tmp_path):
    write_image_folder(str(tmp_path / "a" / "train"), per_class=2)
    write_image_folder(str(tmp_path / "a" / "val"), per_class=1)
    root = str(tmp_path / "a")
    assert input_pipeline.split_folder(root, "train") == os.path.join(root, "train")
    for held_out in ("test", "val", "validation"):
        assert input_pipeline.split_folder(root, held_out) == os.path.join(root, "val")
    src = input_pipeline.make_source(root, "test")
    assert src.total_examples == 2 and src.class_names == ["cat", "dog"]
    with pytest.raises(errors.NotFound, match=r"has no split 'extra': its sub-folders are "
                                              r"train, val"):
        input_pipeline.split_folder(root, "extra")
    flat = str(tmp_path / "flat")  # class folders only: the same images for every split
    write_image_folder(flat, per_class=1)
    assert input_pipeline.split_folder(flat, "test") == flat


def test_commands_start_quietly():
    out = subprocess.run(["vgg-jax", "summary", "vgg11", "--image-size", "32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr == ""
    # the entry points' TensorFlow import (runtime.tensorflow_import): quiet, and output
    # written during it is not filtered
    script = ("import sys\nfrom vgg_jax import runtime\nwith runtime.tensorflow_import():\n"
              "    import vgg_jax.input_pipeline, tensorflow as tf\n"
              "    print('ours', file=sys.stderr)\ntf.constant(1)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stderr == "ours\n"


def test_tensorflow_loads_without_keras_and_keras_still_loads_whole_afterwards():
    """The entry points' TensorFlow import (runtime.tensorflow_import) skips TF's eager load
    of Keras (and Keras' of scikit-learn): none of them is in sys.modules after the input
    pipeline's import; then `import keras` and `tf.keras` work as without vgg_jax. (The
    library's own import does what TensorFlow's does: tests/test_runtime.py.)"""
    script = ("import sys\nfrom vgg_jax import runtime\nwith runtime.tensorflow_import():\n"
              "    import vgg_jax.input_pipeline, tensorflow as tf\n"
              "print(sorted(m for m in ('keras', 'sklearn') if m in sys.modules))\n"
              "import keras\n"
              "print(keras.__version__.split('.')[0], tf.keras.layers.Dense is keras.layers.Dense,"
              " keras.layers.Dense(3)(tf.ones((2, 4))).shape)\n"
              "print([int(v) for v in tf.data.Dataset.range(3).map(lambda x: 2 * x)])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["[]", "3 True (2, 3)", "[0, 2, 4]"], out.stdout


def test_the_heap_is_trimmed_after_each_long_compile_and_only_then(monkeypatch):
    """`vgg_jax.configure_cpu()` installs the malloc_trim listener (glibc here); JAX's own
    compile event reaches it (a renamed event would leave it silent), and it trims only
    after a compile of TRIM_MIN_COMPILE_S or more."""
    import jax
    import numpy as np
    from vgg_jax import runtime
    calls = []
    fake_libc = type("Libc", (), {"malloc_trim": lambda self, pad: calls.append(pad)})()
    assert runtime.trim_heap_after_compiles() and runtime._trim["libc"] is not None
    monkeypatch.setitem(runtime._trim, "libc", fake_libc)
    runtime._trim_after(runtime.BACKEND_COMPILE_EVENT, runtime.TRIM_MIN_COMPILE_S - 0.01)
    runtime._trim_after("/jax/some/other_event", 60.0)
    assert calls == []
    monkeypatch.setattr(runtime, "TRIM_MIN_COMPILE_S", 0.0)
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))  # a new function: a real backend compile
    assert calls and set(calls) == {0}


def test_the_compile_cache_is_created_and_reused(tmp_path):
    cache = tmp_path / "cache"
    script = ("import jax, jax.numpy as jnp; from vgg_jax import runtime, models\n"
              "hits = []\n"
              "jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) "
              "if e == '/jax/compilation_cache/cache_hits' else None)\n"
              "print(runtime.enable_compile_cache())\n"
              "m = models.create_model('A', num_classes=3, width=1/16, fc_widths=(8, 8), "
              "classifier_pool=1)\n"
              "v = models.init_variables(m, jax.random.key(0), 32)\n"
              "jax.jit(lambda v, x: m.apply(v, x, train=False))(v, jnp.ones((1, 32, 32, 3)))\n"
              "print(len(hits))\n")
    env = dict(os.environ, VGG_JAX_COMPILE_CACHE=str(cache))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (path1, hits1), (path2, hits2) = [r.stdout.split() for r in runs]
    assert path1 == path2 == str(cache) and any(cache.iterdir())
    assert int(hits1) == 0 and int(hits2) >= 1
    off = subprocess.run([sys.executable, "-c", "from vgg_jax import runtime; "
                          "print(runtime.enable_compile_cache(''), "
                          "runtime.enable_compile_cache(str(__import__('sys').argv[1])))",
                          str(tmp_path / "explicit")],
                         capture_output=True, text=True, env=dict(env, VGG_JAX_COMPILE_CACHE="off"))
    # the environment turns it off, unless the config names a folder (explicit wins)
    assert off.stdout.split() == ["None", str(tmp_path / "explicit")], off.stderr[-2000:]


def test_killed_at_random_moments_and_during_a_save_then_resumed_is_bit_equal():
    """The short version of bench/fault_injection.py: two kills, one while a checkpoint
    is being written."""
    out = subprocess.run([sys.executable, "bench/fault_injection.py", "--trials", "2",
                          "--steps", "16", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bit_equal"] == 2 and r["killed"] == 2 and r["killed_during_save"] >= 1, r
