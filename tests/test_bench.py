import json
import subprocess
import sys

from conftest import ROOT, user_env


def test_benchmark_smoke_mode_prints_both_frameworks():
    env = user_env()
    out = subprocess.run([sys.executable, "bench/bench_model.py", "--smoke", "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(row["mode"], row["row"]) for row in r["rows"]] == [
        ("train", "torch eager"), ("train", "jax grad+optax"),
        ("train", "jax grad+optax undonated"), ("train", "jax train.py step"),
        ("infer", "torch eager"), ("infer", "jax jit(model.apply)"),
        ("infer", "jax jit(model.apply) (no opt-in)")]
    for row in r["rows"]:  # speed, its first step's compile time and memory, each measured
        assert row["img_per_s"] > 0 and row["compile_s"] > 0 and row["peak_mb"] > 100, row
        # ratios against the faster torch row of its mode (here only eager runs)
        assert row["torch_row"] == "torch eager"
        torch = r["rows"][0 if row["mode"] == "train" else 4]
        assert abs(row["vs_torch"] - row["img_per_s"] / torch["img_per_s"]) < 1e-9
    # the vgg_jax rows say which conv algorithm each layer ran (conv1_1's 3 channels: XLA's)
    assert "xla conv1_1" in r["rows"][1]["conv_impl"]
    # the plain jax.jit(model.apply) gets YNNPACK convs from `vgg_jax.configure_cpu()`, and
    # without that call XLA_FLAGS stays as the process had it
    assert "ynn_fusion_type" in r["rows"][-2]["xla_flags"]
    assert r["rows"][-1]["xla_flags"] == ""


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
    # float32 pixels to the device in the plain pipeline, a quarter of that as uint8
    assert plain["bytes_per_image"] >= 224 * 224 * 3 * 4 > 3 * ours["bytes_per_image"]
    for row in (plain, ours):
        assert row["cores"] == 1 and row["img_per_s"] > 0


def test_eval_benchmark_smoke_mode_counts_compiles_per_bucket():
    out = subprocess.run([sys.executable, "bench/bench_eval.py", "--smoke", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["images"] == 12 and r["distinct_sizes"] == 12
    # Q=256 on sides in [200, 320]: the short side is 256, the long one in [256, 409], so
    # padded to 32s it is one of 6 values: at most 11 shapes (landscape, portrait, square).
    assert 1 <= r["compiles"] <= 11 and r["img_per_s"] > 0


def test_d2l_comparison_smoke_runs_both_sides_on_idx_files(tmp_path):
    """bench/d2l_fashion_mnist.py end to end on tiny IDX files in the official format
    (the recorded runs use the real Fashion-MNIST): vgg_jax through train.py on the TFDS
    dataset prepared from them, the chapter's PyTorch code beside it."""
    from test_idx import write_fashion
    write_fashion(str(tmp_path / "idx"), train=256, test=32)
    out = subprocess.run([sys.executable, "bench/d2l_fashion_mnist.py", "--size", "32",
                          "--epochs", "1", "--limit", "256", "--idx-dir", str(tmp_path / "idx"),
                          "--out", str(tmp_path / "out"), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["side"] for r in rows] == ["vgg_jax", "pytorch"]
    for r in rows:  # an accuracy over exactly the 32 test images, and a measured speed
        assert r["images_per_sec"] > 0 and abs(r["test_acc"] * 32 - round(r["test_acc"] * 32)) < 1e-6, r
    logged = [json.loads(l) for l in open(tmp_path / "out" / "d2l.jsonl")]
    assert [r["side"] for r in logged] == ["vgg_jax", "pytorch"]  # rows as they finish
    drawn = subprocess.run([sys.executable, "bench/d2l_fashion_mnist.py", "--plot", "--out",
                            str(tmp_path / "out"), "--idx-dir", str(tmp_path / "idx")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (tmp_path / "out" / "d2l_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_table_smoke_trains_each_configuration_once(tmp_path):
    """bench/depth_fashion_mnist.py end to end on tiny IDX files (2 steps of A and C, the
    same seed), each evaluated on exactly the 32 test images; a second call reuses the
    rows it has instead of training again."""
    from test_idx import write_fashion
    write_fashion(str(tmp_path / "idx"), train=256, test=32)
    cmd = [sys.executable, "bench/depth_fashion_mnist.py", "--archs", "A,C", "--seeds", "3",
           "--limit", "256", "--idx-dir", str(tmp_path / "idx"), "--out", str(tmp_path / "out"),
           # XLA's conv compiles faster than Winograd's layers; --set reaches train.py
           "--set", "model.conv_impl=xla"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "out" / "depth.jsonl")]
    assert [(r["arch"], r["seed"], r["steps"]) for r in rows] == [("A", 3, 2), ("C", 3, 2)]
    config = json.loads((tmp_path / "out" / "C_seed3" / "config.json").read_text())
    assert config["model"]["conv_impl"] == "xla" and config["model"]["arch"] == "C"
    for r in rows:
        assert abs(r["top1_err"] * 32 - round(r["top1_err"] * 32)) < 1e-6, r
    metrics = tmp_path / "out" / "A_seed3" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and metrics.stat().st_mtime_ns == before
    assert len(open(tmp_path / "out" / "depth.jsonl").readlines()) == 2
    table = again.stdout.splitlines()
    assert table[-2].split()[:2] == ["A", "11"] and table[-1].split()[:2] == ["C", "16"]


def test_depth_table_refuses_a_set_without_a_value_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "bench/depth_fashion_mnist.py", "--set",
                          "model.conv_impl", "--out", str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith(
        "error: --set model.conv_impl: expected KEY=VALUE, e.g. --set train.num_epochs=6")
    assert not (tmp_path / "out").exists()  # refused before any run


def _bench_module(name):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_summary_sums_kernels_per_step_and_leaves_loops_and_runtime_out(tmp_path):
    import gzip
    profile = _bench_module("profile_step")
    events = [dict(ph="X", name="ynn_fusion.3", dur=3000),
              dict(ph="X", name="ynn_fusion.3", dur=1000),
              dict(ph="X", name="add_bitcast_fusion.12", dur=500),
              dict(ph="X", name="while.7", dur=9000),  # encloses the kernels above
              dict(ph="X", name="SlinkyThreadPool::Await", dur=700),
              dict(ph="X", name="jit_step", dur=9500), dict(ph="i", name="dot.1")]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert profile.summarize(str(path), steps=2) == {"ynn_fusion.3": (1.0, 2.0),
                                                      "add_bitcast_fusion.12": (0.5, 0.25)}
    assert profile.kind("add_bitcast_fusion.12") == "add_bitcast_fusion"
    assert profile.kind("reduce-window") == "reduce-window"


def test_bf16_and_profile_benchmarks_smoke_in_process(capsys):
    bf16 = _bench_module("bf16_layers")
    # VGG-16's distinct convs at 32x32, width 1/16 (4-32 channels), each with its count
    convs, fc = bf16.layers("vgg16", 32, 1 / 16)
    assert [(shape, n) for _, shape, n in convs] == [
        ((32, 3, 4), 1), ((32, 4, 4), 1), ((16, 4, 8), 1), ((16, 8, 8), 1), ((8, 8, 16), 1),
        ((8, 16, 16), 2), ((4, 16, 32), 1), ((4, 32, 32), 2), ((2, 32, 32), 3)]
    assert fc == 32 * 1 * 1
    bf16.main(["--smoke", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a_convs, _ = bf16.layers("vgg11", 32, 1 / 16)  # the smoke runs VGG-11 (config A)
    assert [row["layer"] for row in r["rows"]] == [label for label, _, _ in a_convs] + ["fc6-fc8"]
    assert r["rows"][0]["bf16_auto_plan"] == "xla"  # 3 input channels
    for row in r["rows"]:
        assert all(ms > 0 for ms in row["ms"].values()), row
        # every case reports its first call's seconds (vgg_jax: trace + compile + one run)
        assert set(row["first_s"]) == set(row["ms"]) and min(row["first_s"].values()) > 0, row
        best = min(row["ms"]["jax bf16 auto"], row["ms"]["jax bf16 xla"])
        assert abs(row["ratio"] - row["ms"]["torch autocast"] / best) < 1e-9
    assert abs(r["total_ms"]["torch f32"]
               - sum(row["ms"]["torch f32"] * row["times"] for row in r["rows"])) < 1e-6
    assert abs(r["total_first_s"]["jax f32"]
               - sum(row["first_s"]["jax f32"] for row in r["rows"])) < 1e-9
    _bench_module("profile_step").main(["--smoke", "--json"])
    p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert p["wall_ms"] > 0 and p["ops"] and not any(k.startswith("while") for k in p["ops"])
    assert abs(sum(ms for _, ms in p["kinds"].values())
               - sum(ms for _, ms in p["ops"].values())) < 1e-6


def test_compile_time_benchmark_reports_the_step_and_every_layer(capsys):
    """bench/compile_time.py on a tiny VGG-11 (width 1/16, batch 2), in the test process:
    the step's row for the conv algorithm asked, then one row per distinct layer."""
    import re

    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from vgg_jax import runtime
    # the cache on and used, as after an in-process `vgg-jax` command of another test
    runtime.enable_compile_cache()
    jax.jit(lambda v: v + 1)(1.0)
    compile_time = _bench_module("compile_time")
    cache = jax.config.jax_enable_compilation_cache  # the script turns it off
    try:
        compile_time.main(["--arch", "vgg11", "--width", "0.0625", "--batch", "2",
                           "--impls", "xla"])
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        compilation_cache.reset_cache()
    out = capsys.readouterr().out
    [row] = [line.split() for line in out.splitlines() if line.startswith("xla ")]
    lower_wall, _, compile_wall, _, total = map(float, row[1:])
    assert compile_wall > 0 and abs(total - (lower_wall + compile_wall)) < 0.11
    layers = [line for line in out.splitlines() if line.startswith(("conv", "max_pool", "fc6"))]
    # VGG-11's distinct convs (each with 'auto' and with 'xla'), its 5 pools, the head
    convs = [line for line in layers if line.startswith("conv")]
    assert len([c for c in convs if " xla " in c[44:]]) == 7  # 8 convs, two alike at 2x2
    assert sum(line.startswith("max_pool") for line in layers) == 5
    assert re.search(r"with conv 'auto' [\d.]+, with conv 'xla' [\d.]+", out)


def test_winograd_parts_benchmark_smoke_in_process(capsys):
    """bench/winograd_parts.py on tiny layers: each budget's chunks and the library's
    budget; conv1_1's algorithms with 'auto's choice; both tiles of one layer. The budget
    the script sets for its runs is the library's again afterwards."""
    from vgg_jax import winograd
    before = winograd.CHUNK_BYTES
    _bench_module("winograd_parts").main(["--smoke", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert winograd.CHUNK_BYTES == before
    narrow, wide = r["parts"]
    # 0.001 MB is less than one image (8x8x8: 2 KB): a chunk each; 8 MB: the whole batch
    assert narrow["chunks"] == {"0.001": 4, "8.0": 1} and wide["chunks"] == {"0.001": 2, "8.0": 1}
    assert narrow["library_mb"] == wide["library_mb"] == 8
    assert all(ms > 0 for row in r["parts"] for ms in row["ms"].values())
    # every timing comes with its first call's seconds (trace, compile, one run)
    assert all(row["first_s"].keys() == row["ms"].keys() and min(row["first_s"].values()) > 0
               for row in r["parts"] + r["first"])
    [first] = r["first"]
    assert first["auto"] == "xla" and len(first["ms"]) == 6
    # the tile table: both tiles timed on the same layer, beside what 'auto' picks for it
    [tiles] = r["tiles"]
    assert tiles["ms"].keys() == tiles["first_s"].keys() == {"winograd", "winograd4"}
    assert tiles["auto"] == "winograd"  # 64 input channels: F(4x4) needs 256


def test_perceptual_benchmark_smoke_runs_both_frameworks():
    out = subprocess.run([sys.executable, "bench/bench_perceptual.py", "--smoke", "--json"],
                         cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [row["row"] for row in r["rows"]] == ["lpips forward", "lpips forward+backward",
                                                 "stylize step"]
    for row in r["rows"]:
        assert row["jax_img_s"] > 0 and row["torch_img_s"] > 0
        # four significant digits each (bench_perceptual.sig): the ratio within 0.2%
        assert abs(row["vs_torch"] - row["jax_img_s"] / row["torch_img_s"]) <= (
            2e-3 * row["vs_torch"] + 5e-4), row
    assert "cores" in r["machine"]
