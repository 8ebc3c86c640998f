"""Pods and preemptible fleets through the project's own entry points: several processes
of `train.py` and `vgg-jax evaluate` (gloo on 127.0.0.1, fake CPU devices), started with
an address and without one (a SLURM cluster JAX detects), workdirs read on another
topology, one SIGTERM for the whole job, and restores that say what happened. Models are
tiny (VGG-11-BN at width 1/16, 32x32 crops of a small image folder)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, load_config, write_image_folder
from vgg_jax import checkpoint, errors, input_pipeline, models, optim, train

TINY = ["--config.model.width=0.0625", "--config.model.fc_widths=(16, 16)",
        "--config.optim.batch_size=16", "--config.train.progress_bar=False",
        "--config.optim.warmup_epochs=0", "--config.optim.schedule=constant",
        "--config.train.log_every_steps=2", "--config.train.eval_every_epochs=1000",
        "--config.optim.learning_rate=0.05",
        # no zero padding: its constant borders tie in max-pool windows, and a tie that
        # another device count's rounding breaks routes the gradient elsewhere (1e-3 after
        # two steps); random pixels make runs on different topologies agree to 1e-6
        "--config.data.pad=0",
        # XLA's own conv: these tests are about processes, devices and workdirs, and
        # Winograd's layers compile slowly (a cold tiny run: 22 s with 'auto', 15 s with
        # xla, 2026-11-29); the conv algorithms have their own tests (test_conv_impl.py,
        # test_transforms.py, and test_train.py's sharded step)
        "--config.model.conv_impl=xla"]
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ (3 classes x 16) and test/ (3 x 4) of random images of several sizes."""
    root = tmp_path_factory.mktemp("pods") / "images"
    write_image_folder(str(root / "train"), classes=("a", "b", "c"), per_class=16, size=(36, 44))
    write_image_folder(str(root / "test"), classes=("a", "b", "c"), per_class=4, seed=1)
    return str(root)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm(process_id, job):
    """The variables SLURM sets for a 2-task step on one node: JAX finds the cluster (and
    derives the coordinator's port from the job id) without being told."""
    return {"SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2", "SLURM_PROCID": str(process_id),
            "SLURM_LOCALID": str(process_id), "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0"}


def slurm_job():
    """A job id whose derived port (job % 4096 + 61440) is free here."""
    for job in np.random.default_rng().integers(1, 10**6, 50):
        port = int(job) % 4096 + 61440
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return int(job)
            except OSError:
                continue
    raise RuntimeError("no free port")


def train_cmd(workdir, *flags):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *TINY,
            *flags]


def start(cmd, env_extra=None):
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **(env_extra or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def run(cmd, env_extra=None):
    return finish([start(cmd, env_extra)])[0]


def params(workdir, step="latest"):
    _, state = checkpoint.restore_params(str(workdir), step)
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def assert_close(a, b, rtol=1e-3, atol=1e-5):
    """Every array equal to float32 rounding: max |a - b| within rtol of the array's
    largest value (a wrong shard or an unaveraged gradient is off by percents; the
    rounding of two processes' summation order, carried through a few SGD steps and the
    BatchNorm running means, reached 1.5e-4 of the largest value on 2026-11-29). The
    absolute floor is for the conv biases under BatchNorm: their gradient is exactly zero
    (BN subtracts the mean), so after two steps they hold rounding noise of ~1e-6 whose
    value depends on the summation order across devices (more with 'auto', whose
    16-channel layers run Winograd: its rounding is larger than XLA's conv's)."""
    paths_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(paths_a) == len(leaves_b)
    for (path, x), y in zip(paths_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= rtol * np.abs(y).max() + atol, (
            jax.tree_util.keystr(path), np.abs(x - y).max(), np.abs(y).max())


def moved(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def accuracy_line(out):
    return [l for l in out.splitlines() if "top-1 accuracy" in l]


def test_slurm_processes_without_an_address_train_evaluate_and_match_one_process(tmp_path, folder):
    """JAX finds the cluster from SLURM's variables (no address given); 2 processes x 4
    devices give the parameters of 1 process on 1 device (same global batch and seed),
    and the workdir they wrote is read on other topologies."""
    data = [f"--config.data.dataset={folder}", "--config.train.checkpoint_every_steps=2"]
    multi, one = tmp_path / "multi", tmp_path / "one"
    job = slurm_job()
    outs = finish([start(train_cmd(multi, *data, "--config.train.max_steps=2",
                                   "--config.train.distributed=True"),
                         dict(slurm(i, job), **FOUR_DEVICES)) for i in range(2)])
    assert len(accuracy_line(outs[0])) == 1 and accuracy_line(outs[0]) == accuracy_line(outs[1])
    # one process, one device, the same run continued to step 4 in one go
    run(train_cmd(one, *data, "--config.train.max_steps=4"))
    start_state = params(one, 2)
    assert moved(params(multi), jax.tree.map(np.zeros_like, start_state)) > 0
    assert_close(params(multi), start_state)  # a wrong shard or an unaveraged gradient fails
    # the 2 x 4-device workdir resumes on 1 process, 1 device, as the uninterrupted run went on
    run(train_cmd(multi, *data, "--config.train.max_steps=4"))
    assert_close(params(multi), params(one))
    # evaluate on two SLURM processes without an address, reading the workdir on 2 x 1
    # devices (every command reads a workdir through the same restore: the 8-device test
    # below): every test image once, and the same answer on both
    job = slurm_job()
    cmd = ["vgg-jax", "evaluate", "--weights", str(multi), "--data", folder, "--split", "test",
           "--distributed", "--json", "--batch-size", "4"]
    outs = finish([start(cmd, slurm(i, job)) for i in range(2)])
    r = json.loads(outs[0].strip().splitlines()[-1])
    assert r["processes"] == 2 and r["images"] == 12
    assert 0 < r["top1_err"] < 1 and r["top1_err"] * 12 == pytest.approx(round(r["top1_err"] * 12))


def test_a_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes_exactly(
        tmp_path, folder):
    port = free_port()
    w, ref = tmp_path / "w", tmp_path / "ref"
    data = [f"--config.data.dataset={folder}", "--config.train.checkpoint_every_steps=100000"]

    def process(i, max_steps, workdir=w):
        return start(train_cmd(workdir, *data, f"--config.train.max_steps={max_steps}",
                               "--config.train.distributed=True",
                               f"--config.train.coordinator_address=127.0.0.1:{port}",
                               "--config.train.num_processes=2",
                               f"--config.train.process_id={i}"))
    procs = [process(i, 100000) for i in range(2)]
    metrics = w / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one host is preempted; process 0 is not told
    outs = finish(procs)
    steps = [int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2
    for out in outs:
        assert f"preempted: checkpoint saved at step {steps[0]}" in out
    # resumed, the job goes on as one uninterrupted run of the same length, bit for bit. (JAX's
    # preemption notifier polls each second, so the job stops tens of steps after the
    # signal: against a one-process run, rounding would have grown through all of them;
    # two processes against one: test_slurm_...)
    port = free_port()
    finish([process(i, steps[0] + 2) for i in range(2)])
    port = free_port()
    finish([process(i, steps[0] + 2, ref) for i in range(2)])
    assert_close(params(w), params(ref), rtol=0, atol=0)


def test_a_changed_config_is_refused_in_one_line_and_the_history_is_kept(tmp_path):
    w = tmp_path / "w"
    base = ["--config.train.checkpoint_every_steps=2"]

    def train_py(*flags):
        return subprocess.run(train_cmd(w, *base, *flags), cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    assert train_py("--config.train.max_steps=2").returncode == 0
    changed = train_py("--config.train.max_steps=4", "--config.optim.grad_clip_norm=1.0")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    [line] = [l for l in changed.stderr.splitlines() if l.strip()]
    assert line.startswith(f"train.py: error: workdir {w} was trained with another config: "
                           "optim.grad_clip_norm 0.0 -> 1.0.")
    assert "--config.train.allow_config_change=True" in line
    # allowed, but the optimiser state no longer fits: the restore names the arrays and the
    # change, and renames nothing (what train.py prints as its one line; in process here)
    c = load_config()
    c.model.width, c.model.fc_widths, c.optim.grad_clip_norm = 0.0625, (16, 16), 1.0
    model = train.build_model(c, 10)
    tx = optim.make_optimizer(c.optim, models.abstract_variables(model, 32)["params"],
                              optim.learning_rate_schedule(c.optim, 10, 100))
    state = jax.eval_shape(lambda r: train.create_state(model, tx, optim.Plateau(2, 3), r, 32),
                           jax.random.PRNGKey(0))
    with pytest.raises(errors.UserError) as misfit:
        checkpoint.restore_latest(checkpoint.manager(str(w)), state,
                                  "optim.grad_clip_norm 0.0 -> 1.0")
    assert "do not fit this config (config changes: optim.grad_clip_norm 0.0 -> 1.0)" in str(misfit.value)
    assert "opt_state/" in str(misfit.value) and "nothing was moved" in str(misfit.value)
    assert sorted(os.listdir(w / "checkpoints")) == ["2"]
    # a change that fits, when the user says so: resumed, and recorded
    ok = train_py("--config.train.max_steps=4", "--config.optim.learning_rate=0.01",
               "--config.train.allow_config_change=True")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "resumed from step 2" in ok.stderr
    first = json.load(open(w / "config.json"))
    assert first["optim"]["learning_rate"] == 0.05  # the first run's config is kept
    history = [json.loads(l) for l in open(w / "config_history.jsonl")]
    assert [h["step"] for h in history] == [0, 2]
    assert history[1]["changed"] == {"optim.learning_rate": [0.05, 0.01]}
    assert history[1]["config"]["optim.learning_rate"] == 0.01


def _tiny_state():
    m = models.create_model("A", num_classes=3, width=1 / 16, fc_widths=(8, 8), classifier_pool=1)
    return models.init_variables(m, jax.random.key(0), 32)


def test_a_restore_handles_its_read_errors_without_process_wide_hooks(tmp_path):
    state = _tiny_state()
    mngr = checkpoint.manager(str(tmp_path / "w"))
    checkpoint.save(mngr, 1, state, {"per_process": [{"epoch": 0, "offset": 0}]}, wait=True)
    for d, _, files in os.walk(tmp_path / "w" / "checkpoints" / "1" / "state"):
        for f in files:
            if os.sep + "d" + os.sep in os.path.join(d, f):
                os.truncate(os.path.join(d, f), 10)
    hooks = sys.excepthook, threading.excepthook, sys.unraisablehook
    with pytest.raises(errors.UserError, match=r"no checkpoint in .* can be read \(step 1: "):
        checkpoint.restore_latest(checkpoint.manager(str(tmp_path / "w")),
                                  checkpoint.abstract(state))
    assert (sys.excepthook, threading.excepthook, sys.unraisablehook) == hooks
    assert os.listdir(tmp_path / "w" / "checkpoints") == ["1"]  # nothing moved


def test_resume_positions_carry_over_to_another_process_count():
    two = [{"epoch": 3, "offset": 40}, {"epoch": 3, "offset": 40}]
    assert input_pipeline.resume_position(two, 1, 2) == {"epoch": 3, "offset": 40}
    assert input_pipeline.resume_position(two, 0, 1) == {"epoch": 3, "offset": 80}
    assert input_pipeline.resume_position(two, 3, 4) == {"epoch": 3, "offset": 20}
    ahead = [{"epoch": 4, "offset": 0}, {"epoch": 3, "offset": 40}]  # one finished its shard
    assert input_pipeline.resume_position(ahead, 0, 1) == {"epoch": 3, "offset": 80}


def test_a_workdir_saved_on_8_devices_reads_on_1(tmp_path):
    """restore_params builds its target from the saved shapes: the topology that saved
    the arrays (8 fake devices in a subprocess) does not matter."""
    script = ("import jax, sys\nfrom vgg_jax import checkpoint, mesh, models\n"
              "m = models.create_model('A', num_classes=3, width=1/16, fc_widths=(8, 8), "
              "classifier_pool=1)\n"
              "v = models.init_variables(m, jax.random.key(0), 32)\n"
              "_, _, rep = mesh.data_mesh()\n"
              "v = jax.device_put(v, rep)\n"
              "checkpoint.save(checkpoint.manager(sys.argv[1]), 3, v, {}, wait=True)\n"
              "print(jax.device_count())\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert out.returncode == 0 and out.stdout.split()[-1] == "8", out.stderr[-2000:]
    step, state = checkpoint.restore_params(str(tmp_path / "w"))
    assert step == 3
    assert_close(state["params"], _tiny_state()["params"], rtol=0, atol=0)
    assert {d for leaf in jax.tree.leaves(state) for d in leaf.devices()} == {jax.devices()[0]}


def test_skipped_image_names_gather_over_processes_in_order():
    """Every command's summary names the undecodable images of every process: the
    names travel as bytes through one allgather (uneven lengths, spaces, an empty list)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    helper = [sys.executable, os.path.join(ROOT, "tests", "helpers", "gather_strings.py")]
    procs = [subprocess.Popen(helper + [str(i), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    for out, _ in outs:
        assert json.loads(out.strip().splitlines()[-1]) == [
            "/data/cat/broken 1.jpg", "voc/2007:test example #3"]
