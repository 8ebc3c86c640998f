import importlib
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


def user_env() -> dict:
    """The environment of a user's fresh shell: this one without the process-wide settings
    the suite (conftest's configure_cpu) and in-process commands made."""
    return {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "VGG_JAX_KEEP_XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}


def load_config(name="default", arg=None):
    """The packaged config NAME's get_config([arg]) (vgg_jax/configs/NAME.py, which the
    repository's configs/NAME.py points at)."""
    module = importlib.import_module(f"vgg_jax.configs.{name}")
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


def lpips_reference(seed: int = 0):
    """The `lpips` package's LPIPS(net='vgg') (v0.1 linear weights) on a random torchvision
    VGG-16 trunk (no trained VGG can be downloaded here), and that trunk as a torchvision
    state_dict of numpy arrays, for vgg_jax's side (tests and bench/bench_perceptual.py)."""
    import_torchvision()
    import lpips
    import torch
    torch.manual_seed(seed)
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    trunk = [m for s in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4,
                         ref.net.slice5) for m in s]
    return ref, {f"features.{i}.{k}": v.numpy() for i, m in enumerate(trunk)
                 for k, v in m.state_dict().items()}


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


@pytest.fixture(scope="session")
def default_run(tmp_path_factory, worker_id):
    """The README's main job (the `default` config, whole) trained once per test run and
    shared by the tests that need a trained net, whichever xdist worker asks first (a
    file lock in the workers' common temporary folder): (workdir, train_and_evaluate's
    result)."""
    import json

    from filelock import FileLock

    from vgg_jax import train
    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent
    workdir, done = root / "default_run", root / "default_run.json"
    with FileLock(str(root / "default_run.lock")):
        if not done.exists():
            c = load_config()
            c.train.progress_bar = False
            result = train.train_and_evaluate(c, str(workdir))
            done.write_text(json.dumps({k: v for k, v in result.items()
                                        if isinstance(v, (int, float, str))}))
        return str(workdir), json.loads(done.read_text())


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


# The edit loop's subset, `python -m pytest -q tests -m "not slow"` (under 4 minutes on two
# cores): everything but the modules below and the tests that took 4 s or more in the full
# suite on 2026-12-07 (bench/RESULTS.md has the run). The full suite runs them all.
SLOW_MODULES = {"test_imagenet", "test_pods", "test_bench", "test_evaluate", "test_research",
                "test_transforms", "test_readme", "test_gcs", "test_install", "test_perceptual"}
SLOW_TESTS = {
    "test_scr_net_trains_on_the_canvas_digits_and_finds_them",
    "test_pcr_net_trains_on_the_canvas_digits",
    "test_centre_guesses_with_a_classifier_follow_ilsvrcs_rule",
    "test_dense_protocol_at_one_position_is_the_centre_protocol_and_fusing_a_net_with_itself_changes_nothing",
    "test_localize_draws_the_five_guesses_of_each_image",
    "test_box_net_mistakes_are_one_line",
    "test_the_canvas_dataset_prepares_offline_with_tight_boxes_no_constant_box_finds",
    "test_box_heads_predict_one_box_or_one_per_class_standard_and_dense",
    "test_a_corrupted_latest_checkpoint_is_set_aside_and_the_run_resumes",
    "test_a_frozen_batch_norm_computes_in_training_what_it_computes_at_evaluation",
    "test_a_name_not_in_the_cache_offline_is_one_line_naming_the_file_and_the_folder",
    "test_a_non_finite_update_is_never_saved_and_the_message_names_the_good_step",
    "test_a_second_run_on_a_workdir_refuses_and_a_killed_holder_does_not_block",
    "test_a_users_own_jit_compiles_to_the_same_executable_with_and_without_the_import",
    "test_auto_model_equals_the_all_xla_model_in_eval_and_training",
    "test_b_5x5_is_sec_4_1s_shallow_net",
    "test_bf16_compute_keeps_float32_params",
    "test_bn_model_trained_one_step_moves_running_stats_like_torch_momentum_0_1",
    "test_capture_returns_named_layers_and_fc8_is_the_logits",
    "test_classifier_follows_relu_after_fc6_and_fc7",
    "test_cli_convert_predict_features_and_export",
    "test_commands_start_quietly",
    "test_config_errors_are_clear_before_compiling",
    "test_config_mistakes_are_one_line_with_exit_status_2",
    "test_configure_cpu_is_the_one_call_that_sets_the_process_wide_options",
    "test_default_config_reaches_90_percent_on_digits",
    "test_dense_equals_standard_at_224",
    "test_every_command_that_reads_a_net_takes_every_kind_of_name_in_a_fresh_process",
    "test_fashion_mnist_prepares_offline_from_idx_files_and_reads_as_tfds",
    "test_fewer_model_classes_than_the_dataset_has_is_refused",
    "test_frozen_layers_do_not_change_after_a_step",
    "test_full_size_vgg11_logits_match_torch",
    "test_grad_accumulation_equals_one_big_batch_without_bn",
    "test_half_written_checkpoint_is_never_picked_up",
    "test_importing_every_module_leaves_the_process_as_it_found_it",
    "test_importing_the_package_for_models_loads_neither_tensorflow_nor_torch",
    "test_init_from_all_says_what_was_left_out_and_named_layers_must_exist",
    "test_init_variables_draws_the_same_weights_inside_a_callers_jit",
    "test_keras_notop_matches_keras_notop_and_is_a_backbone",
    "test_keras_with_head_matches_keras_predict",
    "test_killed_at_random_moments_and_during_a_save_then_resumed_is_bit_equal",
    "test_logged_learning_rate_is_the_one_the_update_used",
    "test_nested_tfds_names_are_tfds_names_and_paths_are_folders",
    "test_paper_descriptors_are_unit_length_stack_scales_and_skip_broken_images",
    "test_paper_preinit_copies_A_and_draws_the_rest_from_the_paper_init",
    "test_pool_ceil_is_caffes_ceil_mode",
    "test_pre_initialisation_copies_exactly_the_named_layers_from_A_into_D",
    "test_sharded_step_on_8_fake_devices_equals_one_device",
    "test_sigterm_leaves_a_checkpoint_at_the_current_step",
    "test_small_width_runs_at_32",
    "test_tensorflow_loads_without_keras_and_keras_still_loads_whole_afterwards",
    "test_test_time_flips_follow_the_weights_recipe_and_no_flip_dense_is_the_centre_crop",
    "test_the_compile_cache_is_created_and_reused",
    "test_the_training_step_compiles_with_the_memory_minimizing_scheduler",
    "test_torchvision_weights_see_what_torchvisions_own_transform_feeds_them",
    "test_train_config_files_that_raise_are_one_line",
    "test_train_mode_updates_batch_stats_and_needs_dropout_rng",
    "test_training_gradients_match_torch_at_small_inputs",
    "test_vgg_jax_usage_errors_are_one_line_with_exit_status_2",
    "test_whole_model_is_the_same_with_any_conv",
    "test_winograd_chunks_of_a_sharded_batch_stay_on_their_devices",
    "test_winograd_over_batch_chunks_matches_xla_outputs_and_gradients",
}


# Seconds per file in the full suite (2026-12-07, three workers, 17:00 UTC run): files run
# longest first (pyproject's --no-loadscope-reorder keeps this order; pytest-xdist would
# otherwise order files by their number of tests), so that whole-file scheduling does not
# leave one worker alone with a long file at the end.
FILE_SECONDS = {"test_bench": 260, "test_localisation": 258, "test_reliability": 221,
                "test_gcs": 191, "test_evaluate": 167, "test_pods": 162, "test_train": 134,
                "test_imagenet": 128, "test_perceptual": 111, "test_research": 109,
                "test_conv_impl": 102, "test_importers": 101, "test_convert": 90,
                "test_models": 85, "test_transforms": 68, "test_published": 64,
                "test_readme": 45, "test_fidelity": 48, "test_runtime": 25,
                "test_input_pipeline": 22, "test_cli_errors": 22, "test_install": 20,
                "test_boxes": 11, "test_idx": 8, "test_configs": 8, "test_layout": 8,
                "test_summary": 3}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-FILE_SECONDS.get(item.module.__name__, 0), order[id(item)]))


# VGG_JAX_TEST_TIMELINE=FILE: each test's worker, start and end (JSON lines, appended), to
# see where the suite's two workers wait (bench/RESULTS.md's suite entries).
TIMELINE = os.environ.get("VGG_JAX_TEST_TIMELINE")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not TIMELINE:
        return (yield)
    import json
    import time
    start = time.time()
    try:
        return (yield)
    finally:
        with open(TIMELINE, "a") as f:
            f.write(json.dumps(dict(worker=os.environ.get("PYTEST_XDIST_WORKER", "main"),
                                    test=item.nodeid, start=start, end=time.time())) + "\n")
