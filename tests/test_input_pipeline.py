"""Input pipeline on data made offline: image folders written here and the bundled digits."""
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from vgg_jax import input_pipeline as ip
from vgg_jax import eval_data, pixels, preprocess


def paper_data(config, size=32, s_min=40, s_max=48):
    d = config.data
    d.recipe, d.image_size, d.s_min, d.s_max, d.eval_scale = "paper", size, s_min, s_max, 40
    d.flip, d.colour_pca, d.normalization = True, True, "paper"
    return d


def test_folder_train_and_eval_batches_shapes_dtypes_ranges(tmp_path, config):
    write_image_folder(tmp_path / "imgs", per_class=6)
    d = paper_data(config)
    src = ip.make_source(str(tmp_path / "imgs"), "train")
    assert src.class_names == ["cat", "dog"] and src.num_examples == 12
    batch = next(ip.TrainIterator(src, d, 4, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["alpha"].shape == (4, 3) and batch["alpha"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1}
    assert batch["image"].nbytes == 4 * 32 * 32 * 3  # one byte per pixel value to the device
    # on the device, paper normalisation: 0..255 minus the mean RGB, plus a colour shift
    x = np.asarray(pixels.for_data(d)(batch["image"], batch["alpha"]))
    assert -123.68 - 20 < x.min() < 0 < x.max() < 255 - 103.94 + 20
    ev = list(eval_data.eval_batches(src, d, 5))
    assert [b["image"].shape for b in ev] == [(5, 32, 32, 3)] * 3
    assert all(b["image"].dtype == np.uint8 for b in ev)
    assert sum(b["mask"].sum() for b in ev) == 12


def test_digits_batches(config):
    src = ip.make_source("vgg_digits", "train")
    assert (src.total_examples, src.num_classes) == (1437, 10)
    batch = next(ip.TrainIterator(src, config.data, 16, seed=0))
    assert batch["image"].shape == (16, 32, 32, 3) and "alpha" not in batch  # no colour shift
    x = np.asarray(pixels.for_data(config.data)(batch["image"]))
    assert x.min() >= -1.0 and x.max() <= 1.0  # 'unit' normalisation
    test = ip.make_source("vgg_digits", "test")
    assert test.total_examples == 360


@pytest.mark.parametrize("h,w,s", [(375, 500, 256), (500, 375, 256), (100, 50, 384), (64, 64, 224)])
def test_rescale_keeps_aspect_and_smallest_side_is_s(h, w, s):
    out = preprocess.rescale(tf.zeros((h, w, 3), tf.uint8), s)
    oh, ow = out.shape[:2]
    assert min(oh, ow) == s
    assert abs(oh / ow - h / w) < 2 / s  # aspect kept up to the integer rounding


def test_scale_jitter_covers_the_range():
    draws = {int(preprocess.sample_scale(tf.constant([0, i], tf.int64), 256, 260))
             for i in range(300)}
    assert draws == {256, 257, 258, 259, 260}
    assert int(preprocess.sample_scale(tf.constant([0, 1], tf.int64), 384, 384)) == 384


def test_random_crop_lies_inside_the_image():
    h, w = 50, 70
    coords = tf.cast(tf.reshape(tf.range(h * w), (h, w, 1)), tf.float32)
    for i in range(20):
        crop = preprocess.random_crop(coords, 32, tf.constant([1, i], tf.int64)).numpy()[..., 0]
        y0, x0 = divmod(int(crop[0, 0]), w)
        expected = (np.arange(y0, y0 + 32)[:, None] * w + np.arange(x0, x0 + 32)[None, :])
        np.testing.assert_array_equal(crop, expected)


def test_flip_flips_or_keeps():
    img = tf.reshape(tf.range(2 * 3 * 1, dtype=tf.float32), (2, 3, 1))
    seen = set()
    for i in range(20):
        out = preprocess.random_flip(img, tf.constant([2, i], tf.int64)).numpy()
        if np.array_equal(out, img.numpy()[:, ::-1]):
            seen.add("flipped")
        else:
            np.testing.assert_array_equal(out, img.numpy())
            seen.add("kept")
    assert seen == {"flipped", "kept"}


def pca_colour_shift(image, seed, eigval=preprocess.IMAGENET_EIGVAL,
                     eigvec=preprocess.IMAGENET_EIGVEC, alpha_std=0.1):
    """Krizhevsky et al. 2012's shift written out on the host, per image (the pipeline
    applies it on the device, batched: pixels.Pixels)."""
    alpha = preprocess.pca_alpha(seed, alpha_std).numpy()
    shift = np.asarray(eigvec, np.float32) @ (alpha * np.asarray(eigval, np.float32))
    return np.asarray(image, np.float32) + 255.0 * shift


def normalize(image, norm: dict):
    out = (np.asarray(image, np.float32) - np.asarray(norm["mean"], np.float32)) / np.asarray(
        norm["std"], np.float32)
    return out[..., ::-1] if norm["bgr"] else out


def test_pca_colour_shift_has_the_documented_covariance():
    """pixels.Pixels' shift, from the pipeline's alpha draws, over 4000 seeds."""
    d = preprocess.normalization("unit")
    px = pixels.Pixels(tuple(d["mean"]), tuple(d["std"]))
    alpha = np.stack([preprocess.pca_alpha(tf.constant([3, i], tf.int64)).numpy()
                      for i in range(4000)])
    zero = np.full((4000, 1, 1, 3), 127.5, np.float32)  # 'unit': (x - 127.5) / 127.5
    shifts = np.asarray(px(zero, alpha)).reshape(4000, 3) * 127.5
    v = np.asarray(preprocess.IMAGENET_EIGVEC)
    lam = np.asarray(preprocess.IMAGENET_EIGVAL)
    expected = 255.0 ** 2 * v @ np.diag((0.1 * lam) ** 2) @ v.T
    np.testing.assert_allclose(np.cov(shifts.T), expected, rtol=0.1, atol=0.02 * expected.max())
    assert abs(shifts.mean(0)).max() < 0.1 * np.sqrt(expected.max())


def test_mean_subtraction_uses_the_configured_mean():
    img = np.full((1, 2, 2, 3), 200, np.uint8)

    def device(normalization, mean=None, std=None):
        d = dict(normalization=normalization, mean=mean, std=std)
        return np.asarray(pixels.for_data(ml_collections.ConfigDict(d))(img))[0, 0, 0]

    np.testing.assert_allclose(device("paper"), 200.0 - np.asarray(preprocess.IMAGENET_MEAN_RGB),
                               rtol=1e-6)
    np.testing.assert_allclose(device("custom", (10, 20, 30), (2, 2, 2)), [95, 90, 85])
    np.testing.assert_allclose(device("caffe"),
                               (200.0 - np.asarray(preprocess.IMAGENET_MEAN_RGB))[::-1], rtol=1e-6)



def test_same_seed_same_batches_and_resume_replays_exactly(config):
    src = ip.make_source("vgg_digits", "train")
    a = ip.TrainIterator(src, config.data, 32, seed=5)
    first = [next(a) for _ in range(3)]
    state = dict(a.state)
    after = [next(a) for _ in range(2)]
    b = ip.TrainIterator(src, config.data, 32, seed=5)
    for x, y in zip(first, [next(b) for _ in range(3)]):
        np.testing.assert_array_equal(x["image"], y["image"])
    resumed = ip.TrainIterator(src, config.data, 32, seed=5, state=state)
    for x, y in zip(after, [next(resumed) for _ in range(2)]):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    other = next(ip.TrainIterator(src, config.data, 32, seed=6))
    assert not np.array_equal(other["image"], first[0]["image"])


def _labels_and_pixels(source, data_cfg):
    out = []
    for b in eval_data.eval_batches(source, data_cfg, 64):
        keep = b["mask"] > 0
        out += [(int(l), float(i.sum())) for l, i in zip(b["label"][keep], b["image"][keep])]
    return out


@pytest.mark.parametrize("kind", ["tfds", "folder"])
def test_process_shards_are_disjoint_and_cover_the_split(tmp_path, config, kind):
    if kind == "folder":
        write_image_folder(tmp_path / "f", classes=("a", "b", "c"), per_class=7)
        name, split, d = str(tmp_path / "f"), None, paper_data(config)
    else:
        name, split, d = "vgg_digits", "test", config.data
    whole = _labels_and_pixels(ip.make_source(name, split), d)
    parts = [_labels_and_pixels(ip.make_source(name, split, process_index=i, process_count=3), d)
             for i in range(3)]
    assert sum(len(p) for p in parts) == len(whole)
    assert sorted(x for p in parts for x in p) == sorted(whole)
    assert all(len(set(p) & set(q)) == 0 for i, p in enumerate(parts) for q in parts[i + 1:]) \
        or len(set(whole)) < len(whole)


def test_padded_eval_batches_count_every_example_once_on_every_process(config):
    sources = [ip.make_source("vgg_digits", "test", process_index=i, process_count=7)
               for i in range(7)]
    batches = [list(eval_data.eval_batches(s, config.data, 16)) for s in sources]
    assert len({len(b) for b in batches}) == 1  # same number of steps on every process
    assert sum(b["mask"].sum() for bs in batches for b in bs) == 360
    assert all(b["image"].shape == (16, 32, 32, 3) for bs in batches for b in bs)


def test_corrupt_jpeg_is_skipped_counted_and_the_run_goes_on(tmp_path, config, caplog):
    write_image_folder(tmp_path / "imgs", per_class=4, formats=("jpg",))
    bad = tmp_path / "imgs" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    d = paper_data(config)
    src = ip.make_source(str(tmp_path / "imgs"), None)
    it = ip.TrainIterator(src, d, 3, seed=0)
    batches = [next(it) for _ in range(6)]  # 9 good images: crosses an epoch boundary
    assert all(b["image"].shape == (3, 32, 32, 3) for b in batches)
    assert it.skipped and set(it.skipped) == {str(bad)}
    assert "broken.jpg" in caplog.text


def test_eval_batches_name_every_image_they_skip_and_cover_the_rest_once(tmp_path, config):
    """Training-time validation and `embed`: undecodable images are counted and named
    (they were dropped silently), the first and the last of the split included."""
    paths = write_image_folder(tmp_path / "imgs", per_class=4, formats=("png",))
    for p in (paths[0], paths[-1]):
        with open(p, "wb") as f:
            f.write(b"not an image")
    skipped = eval_data.Skipped(ip.make_source(str(tmp_path / "imgs"), None))
    batches = list(eval_data.eval_batches(skipped.source, paper_data(config), 3,
                                          skipped=skipped))
    assert sum(b["mask"].sum() for b in batches) == len(paths) - 2 and len(batches) == 3
    assert sorted(skipped.names) == sorted(map(str, (paths[0], paths[-1])))
    assert skipped.summary() == dict(skipped=2, skipped_images=skipped.names)


def _failing_after_decode(image, *args, **kwargs):  # noqa: ARG001
    """A stand-in for the geometry after decoding with a bug: it fails at run time."""
    tf.debugging.assert_less(tf.shape(image)[0], 0, message="a bug after decoding")
    return image


def test_an_error_after_decoding_is_raised_not_counted_as_a_broken_image(tmp_path, config,
                                                                         monkeypatch):
    """Only decoding may drop an image: a pipeline bug after it (here in the view or the
    training geometry) stops the run with its own message, in evaluation and training."""
    write_image_folder(tmp_path / "imgs", per_class=3, formats=("png",))
    d = paper_data(config)
    src = ip.make_source(str(tmp_path / "imgs"), None)
    monkeypatch.setattr(preprocess, "eval_view", _failing_after_decode)
    skipped = eval_data.Skipped(src)
    with pytest.raises(tf.errors.InvalidArgumentError, match="a bug after decoding"):
        list(eval_data.eval_batches(src, d, 3, skipped=skipped))
    assert skipped.names == []
    monkeypatch.setattr(preprocess, "train_view",
                        lambda image, *a: (_failing_after_decode(image), tf.zeros([3])))
    it = ip.TrainIterator(src, d, 3, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="a bug after decoding"):
        next(it)
    assert it.skipped == []


def test_nested_tfds_names_are_tfds_names_and_paths_are_folders(tmp_path):
    assert not ip.is_folder("voc/2007") and not ip.is_folder("imagenet2012:5.1.0")
    assert not ip.is_folder("cifar10")
    assert ip.is_folder(str(tmp_path)) and ip.is_folder("./nope") and ip.is_folder("/data/x")
    os.makedirs(tmp_path / "voc" / "2007")  # a folder of that name on disk wins
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert ip.is_folder("voc/2007")
    finally:
        os.chdir(cwd)
    with pytest.raises(ValueError, match="unknown TFDS dataset 'nope/2007' and no folder "
                                         "nope/2007 exists"):
        ip.make_source("nope/2007", "test", str(tmp_path))


def test_missing_folder_and_empty_class_are_reported_with_their_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path}/nope does not exist"):
        ip.make_source(str(tmp_path / "nope"), None)
    write_image_folder(tmp_path / "imgs", per_class=2)
    os.makedirs(tmp_path / "imgs" / "zebra")
    with pytest.raises(ValueError, match=r"class folder .*imgs/zebra has no images"):
        ip.make_source(str(tmp_path / "imgs"), None)


def test_imagenet_says_where_the_tars_go(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ip.make_source("imagenet2012", "train", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in msg
    assert os.path.join(str(tmp_path), "downloads", "manual") in msg
    # the command it names is the one that prepares (not itself, not Beam's `tfds build`)
    assert f"vgg-jax prepare imagenet2012 --data-dir {tmp_path}" in msg
    assert "tfds build" not in msg


def test_unknown_tfds_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_set'"):
        ip.make_source("no_such_set", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown config in TFDS dataset 'mnist/nope'"):
        ip.make_source("mnist/nope", "train", data_dir=str(tmp_path))


def test_fused_jpeg_decode_and_crop_is_a_window_of_the_rescaled_image(tmp_path, config):
    """Each fused crop (crop the JPEG window, then resize) equals, to JPEG/resampling
    error, some 32x32 window of the image rescaled to S = 48 then cropped, the way
    the unfused path computes it; over 24 seeds the windows found reach both ends of
    the valid offsets (a wrong scale matches no window, a fixed offset one only)."""
    from PIL import Image
    ys, xs = np.mgrid[0:80, 0:120].astype(np.float32)
    image = np.stack([xs * 255 / 119, ys * 255 / 79, (xs + ys) * 255 / 198], -1)
    Image.fromarray(image.round().astype(np.uint8)).save(tmp_path / "g.jpg", quality=98)
    raw = tf.io.read_file(str(tmp_path / "g.jpg"))
    rescaled = preprocess.rescale(preprocess.decode(raw, 3), 48, False).numpy()  # 48 x 72
    offsets = set()
    for i in range(24):
        fused = preprocess.fused_jpeg_scale_crop(raw, 3, 48, 32, tf.constant([i, 7], tf.int64))
        fused = fused.numpy()
        errors = {(y, x): np.abs(fused - rescaled[y:y + 32, x:x + 32]).max()
                  for y in range(48 - 32 + 1) for x in range(72 - 32 + 1)}
        best = min(errors, key=errors.get)
        assert errors[best] < 6, (i, best, errors[best])
        offsets.add(best)
    assert min(x for _, x in offsets) <= 4 and max(x for _, x in offsets) >= 36
    assert min(y for y, _ in offsets) <= 3 and max(y for y, _ in offsets) >= 13


@pytest.mark.parametrize("normalization", ["paper", "torchvision", "caffe"])
def test_device_normalisation_equals_the_host_side_computation_for_the_same_seeds(
        tmp_path, config, normalization):
    """The pipeline ships uint8 crops and the colour shift's alphas; the device's
    Pixels(images, alpha) equals what the host used to compute (tf colour shift with the
    same per-example seed, then mean/std and BGR) on those pixels."""
    write_image_folder(tmp_path / "imgs", per_class=4, size=(50, 60))
    d = paper_data(config)
    d.normalization = normalization
    src = ip.make_source(str(tmp_path / "imgs"), "train")
    batch = next(ip.TrainIterator(src, d, 8, seed=7))
    device = np.asarray(pixels.for_data(d)(batch["image"], batch["alpha"]))
    norm = preprocess.normalization(normalization)
    for pos in range(8):  # no skipped images: batch element i is epoch position i
        s = tf.stack([tf.constant(ip._mix(7, 0), tf.int64), tf.constant(pos, tf.int64)])
        s_pca = preprocess.seeds(s, 4)[3]
        shifted = pca_colour_shift(batch["image"][pos], s_pca, d.pca_eigval, d.pca_eigvec,
                                   d.pca_std)
        host = normalize(shifted, norm)
        np.testing.assert_allclose(device[pos], host, rtol=1e-6, atol=1e-4)
    assert np.abs(batch["alpha"]).max() > 0  # the shift is really there


class _Piece:  # what TFDS's file instructions hold
    def __init__(self, filename, skip, take):
        self.filename, self.skip, self.take = filename, skip, take


def _records(tmp_path, sizes=(7, 5, 9, 3, 6)):
    """TFRecord files of numbered records, and TFDS-style pieces over them (the first
    skips one record, as an even split's part may)."""
    pieces, number = [], 0
    for i, n in enumerate(sizes):
        path = str(tmp_path / f"part-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for _ in range(n):
                w.write(str(number).encode())
                number += 1
        pieces.append(_Piece(path, 1 if i == 0 else 0, n - (1 if i == 0 else 0)))
    return pieces


def _read(ds):
    return [(int(p), int(r)) for p, r in ds.as_numpy_iterator()]


def test_windowed_shuffle_is_entered_anywhere_without_reading_what_comes_before(tmp_path):
    pieces = _records(tmp_path)
    full = _read(ip._windowed_shuffle(pieces, 4, 11, 0, str(tmp_path)))
    records = [r for _, r in full]
    assert [p for p, _ in full] == list(range(29))  # positions, numbered in order
    assert sorted(records) == list(range(1, 30))  # every record of the pieces once
    assert records != sorted(records)  # shuffled ...
    assert records != [r for _, r in _read(ip._windowed_shuffle(pieces, 4, 12, 0, str(tmp_path)))]
    for start in range(30):  # ... and entered anywhere it is the tail of the whole epoch
        assert _read(ip._windowed_shuffle(pieces, 4, 11, start, str(tmp_path))) == full[start:]
    # late in the epoch, the pieces before the entry window are never opened
    start = 25
    needed = {r for _, r in full[(start // 4) * 4:]}
    order = np.random.default_rng(11).permutation(len(pieces))
    for i in order:
        first = pieces[i].skip + sum(p.take + p.skip for p in pieces[:i])
        if not needed & set(range(first, first + pieces[i].take)):
            os.remove(pieces[i].filename)
        else:
            break
    assert sum(os.path.exists(p.filename) for p in pieces) < len(pieces)
    assert _read(ip._windowed_shuffle(pieces, 4, 11, start, str(tmp_path))) == full[start:]


def test_folder_training_order_is_one_global_order_whatever_the_process_count(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=7)  # 21 images
    root = str(tmp_path / "imgs")

    def epoch(source, block, start=0):
        return [(int(p), int(u), bytes(b)) for p, u, b, _ in
                source.train_dataset(2, 5, start, block).as_numpy_iterator()]
    one = epoch(ip.make_source(root, None), 6)
    assert [u for _, u, _ in one] == list(range(21))
    parts = [epoch(ip.make_source(root, None, process_index=i, process_count=3), 2)
             for i in range(3)]
    # process p's k-th block of 2 is rows 2p..2p+1 of the k-th global batch of 6
    for k in range(3):
        batch = [x for part in parts for x in part[2 * k:2 * k + 2]]
        assert [(u, b) for _, u, b in batch] == [(u, b) for _, u, b in one[6 * k:6 * k + 6]]
    assert sorted(u for part in parts for _, u, _ in part) == list(range(21))
    # entering at a position reads from there on (the files before it are not opened)
    src = ip.make_source(root, None, process_index=1, process_count=3)
    assert epoch(src, 2, 4) == parts[1][4:]
    paths = np.asarray(ip.folder_index(root)[0])
    order = np.random.default_rng(ip._mix(5, 2)).permutation(21)  # epoch 2, seed 5
    for _, uid, _ in parts[1][:4]:
        os.remove(paths[order[uid]])
    assert epoch(src, 2, 4) == parts[1][4:]


def test_centre_crop_offsets_are_torchvisions():
    """torchvision.transforms.functional.center_crop (0.29): crop_top =
    int(round((image_height - crop_height) / 2.0)), Python's round (halves to even). Every
    difference 0..40 on both axes, against that formula and the pixels it selects."""
    for diff_h in range(41):
        for diff_w in (0, 3, 7, 10):
            h, w = 8 + diff_h, 8 + diff_w
            image = np.arange(h * w, dtype=np.int32).reshape(h, w, 1)
            top, left = int(round(diff_h / 2.0)), int(round(diff_w / 2.0))
            got = preprocess.center_crop(tf.constant(image), 8).numpy()
            np.testing.assert_array_equal(got, image[top:top + 8, left:left + 8], (h, w))
    assert int(round(3 / 2.0)) == 2 and (3 // 2) == 1  # where a floor was one pixel off


def test_dataset_stats_sample_the_whole_split_and_skip_broken_images(tmp_path):
    """Ten black then ten white images (class folders in that order) and a broken file:
    8 images drawn at random see both classes (the first 8 files are all black); over
    everything the mean is the exact mix and the broken file is counted, not fatal."""
    from PIL import Image
    for cls, value in (("a_black", 0), ("b_white", 255)):
        os.makedirs(tmp_path / cls)
        for i in range(10):
            Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "b_white" / "broken.png").write_bytes(b"not a png")
    some = eval_data.dataset_stats(str(tmp_path), max_images=8)
    assert 0 < some["mean"][0] < 255 and some["images"] + some["skipped"] == 8
    every = eval_data.dataset_stats(str(tmp_path), max_images=100)
    assert (every["images"], every["skipped"]) == (20, 1)
    assert every["skipped_images"] == [str(tmp_path / "b_white" / "broken.png")]
    assert set(some["skipped_images"]) <= set(every["skipped_images"])
    np.testing.assert_allclose(every["mean"], [127.5] * 3)
