import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_benchmark_smoke_mode_prints_both_frameworks():
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, "bench/bench_model.py", "--smoke", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [row["mode"] for row in r["rows"]] == ["train", "infer"]
    for row in r["rows"]:
        assert row["jax"]["img_per_s"] > 0 and row["torch"]["img_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["jax"]["img_per_s"] / row["torch"]["img_per_s"])
        assert row["jax"]["peak_mb"] > 0


def test_input_benchmark_smoke_mode_times_the_real_pipeline():
    out = subprocess.run([sys.executable, "bench/bench_input.py", "--smoke", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["image_size"] == 224 and r["images_timed"] == 16
    assert 30 < r["jpeg_kb"] < 300  # ImageNet-like JPEGs, not tiny ones
    plain, ours = r["rows"]
    assert plain["variant"].startswith("plain") and plain["dtype"] == "float32"
    assert ours["dtype"] == "uint8" and ours["bytes_per_image"] == 224 * 224 * 3 + 3 * 4 + 4
    for row in (plain, ours):
        assert row["cores"] == 1 and row["img_per_s"] > 0
        assert row["img_per_s_per_core"] == pytest.approx(row["img_per_s"])
    assert ours["vs_plain"] == pytest.approx(ours["img_per_s"] / plain["img_per_s"])


def test_eval_benchmark_smoke_mode_counts_compiles_per_bucket():
    out = subprocess.run([sys.executable, "bench/bench_eval.py", "--smoke", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["images"] == 12 and r["distinct_sizes"] == 12
    # Q=256 on sides in [200, 320]: the short side is 256, the long one in [256, 409], so
    # padded to 32s it is one of 6 values: at most 11 shapes (landscape, portrait, square).
    assert 1 <= r["compiles"] <= 11 and r["img_per_s"] > 0
