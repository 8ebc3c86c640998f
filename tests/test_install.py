"""Training from an installed wheel (issue 48): the package built as a wheel and installed
into a fresh virtual environment outside the checkout trains by config name, with the
configs it ships (vgg_jax.configs), from a directory that has no configs/ or train.py."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, user_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    src = base / "src"  # build from a copy: the build writes build/ and *.egg-info beside it
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "workdir*", "runs", ".pytest_cache"))
    # the build backend from this environment when it has one (a venv of Python >= 3.12
    # has no setuptools), else pip's isolated build fetches it from the package index
    import importlib.util
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(base / "dist"), str(src)], check=True, capture_output=True,
                   timeout=600)
    wheel, = (base / "dist").glob("vgg_jax-*.whl")
    # the dependencies come from this interpreter's site-packages; vgg_jax from the wheel
    # (--without-pip: this interpreter's pip, seen through the system site-packages,
    # installs into the venv; a Python without ensurepip can make it too)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(base / "venv")], check=True, timeout=600)
    subprocess.run([str(base / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, timeout=600)
    return base / "venv"


def test_an_installed_wheel_trains_by_config_name_from_any_directory(venv, tmp_path):
    env = {k: v for k, v in user_env().items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import vgg_jax, vgg_jax.configs.imagenet as c; "
                            "print(vgg_jax.__file__); print(c.get_config('D,384').model.arch)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert where.returncode == 0, where.stderr[-2000:]
    file, arch = where.stdout.split()
    assert file.startswith(str(venv)) and arch == "D", where.stdout  # the wheel's copy
    assert not (tmp_path / "configs").exists()
    r = subprocess.run([str(venv / "bin" / "vgg-jax"), "train", "--config", "default",
                        "--workdir", "wd", "--config.train.max_steps=2",
                        "--config.model.width=0.0625", "--config.model.fc_widths=(16, 16)",
                        "--config.model.conv_impl=xla", "--config.train.progress_bar=False",
                        "--config.optim.batch_size=16"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "top-1 accuracy" in r.stdout and "after 2 steps" in r.stdout, r.stdout
    assert (tmp_path / "wd" / "checkpoints" / "2").is_dir()
    r = subprocess.run([str(venv / "bin" / "vgg-jax"), "train", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("usage: vgg-jax train [--config NAME"), r
    assert "packaged: cifar10_vgg16_bn, default, digits_localisation, fashion_mnist_depth" in r.stdout
    # a name it does not ship: one line with the names it does
    r = subprocess.run([str(venv / "bin" / "vgg-jax"), "train", "--config", "imagenet2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "vgg-jax train: error: config file imagenet2 not found (give --config a packaged config "
        "(cifar10_vgg16_bn, default, digits_localisation, fashion_mnist_depth, "
        "fashion_mnist_vgg11_small, "
        "finetune_folder, imagenet, imagenet_localisation) or a config file's path)")
