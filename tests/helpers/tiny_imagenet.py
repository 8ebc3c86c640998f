"""A tiny ImageNet in the official archive layout, written from scikit-learn's two photos.

ILSVRC2012_img_train.tar is a tar of per-synset tars (`n01440764.tar` holding
`n01440764_<i>.JPEG`); ILSVRC2012_img_val.tar is a flat tar of
`ILSVRC2012_val_<8 digits>.JPEG`, whose labels TFDS looks up in its own copy of the
official validation ground truth (the synset of ILSVRC2012_val_00000001 is n01751748, ...).
"""
import io
import os
import tarfile

import numpy as np
from PIL import Image


def _labels_file(name):
    import tensorflow_datasets as tfds
    root = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
    with open(os.path.join(root, name)) as f:
        return [line.strip() for line in f]


def validation_synsets():
    """The official synset of ILSVRC2012_val_<i+1>, from TFDS's copy of the ground truth."""
    return _labels_file("validation_labels.txt")


def _photos():
    from sklearn.datasets import load_sample_images
    return load_sample_images().images  # china.jpg, flower.jpg: 427x640x3 uint8


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _variant(photo, i, rng):
    """A crop of a photo with a size that differs per image (portrait and landscape)."""
    h, w = photo.shape[:2]
    ch = int(rng.integers(h // 2, h))
    cw = int(rng.integers(w // 3, w))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = photo[y:y + ch, x:x + cw]
    return out[:, ::-1] if i % 2 else out


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_archives(manual_dir, per_class=4, num_val=8, seed=0):
    """Writes ILSVRC2012_img_train.tar (the synsets of the first `num_val` validation
    images, `per_class` images each) and ILSVRC2012_img_val.tar (`num_val` images) into
    `manual_dir`; returns {'train': {synset: n}, 'validation': [synset, ...]}."""
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _photos()
    val_synsets = validation_synsets()[:num_val]
    train_synsets = sorted(set(val_synsets))
    # Each synset gets one of the two photos, so the task is learnable.
    photo_of = {s: photos[k % 2] for k, s in enumerate(train_synsets)}
    sizes = {}  # file name -> (height, width)

    def jpeg(name, array):
        sizes[name] = array.shape[:2]
        return _jpeg(array)

    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for s in train_synsets:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(per_class):
                    name = f"{s}_{i + 1}.JPEG"
                    _add(inner, name, jpeg(name, _variant(photo_of[s], i, rng)))
            _add(outer, f"{s}.tar", buf.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for i, s in enumerate(val_synsets):
            name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            _add(tar, name, jpeg(name, _variant(photo_of[s], i, rng)))
    return {"train": {s: per_class for s in train_synsets}, "validation": val_synsets,
            "sizes": sizes}


def _annotation(stem, synset, size, objects) -> bytes:
    """A PASCAL VOC annotation as the ILSVRC box archives hold them."""
    h, w = size
    boxes = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>" for name, (x0, y0, x1, y1) in objects)
    return (f"<annotation><folder>{synset}</folder><filename>{stem}</filename><source>"
            f"<database>ILSVRC_2012</database></source><size><width>{w}</width><height>{h}"
            f"</height><depth>3</depth></size><segmented>0</segmented>{boxes}</annotation>"
            ).encode()


def write_box_archives(manual_dir, layout, seed=0, without_boxes=1):
    """Writes ILSVRC2012_bbox_train_v2.tar.gz (boxes for all but the last `without_boxes`
    training images of each synset, as the official archive has boxes for some) and
    ILSVRC2012_bbox_val_v3.tgz (every validation image) for `write_archives`' images: one
    or two random boxes of the image's class, the second image of each synset also one of
    another synset (which the dataset leaves out). Returns {image stem: [(synset, (x0, y0,
    x1, y1) pixels)]} of the boxes written."""
    rng = np.random.default_rng(seed)
    written = {}

    def objects(synset, size, extra):
        h, w = size
        out = []
        for _ in range(int(rng.integers(1, 3))):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            out.append((synset, (x0, y0, int(rng.integers(x0 + 8, w)), int(rng.integers(y0 + 8, h)))))
        if extra:
            out.append(("n00000000", (0, 0, w // 4, h // 4)))
        return out

    def archive(path, items):
        with tarfile.open(path, "w:gz") as tar:
            for folder, stem, synset, size, extra in items:
                written[stem] = objects(synset, size, extra)
                _add(tar, f"{folder}/{stem}.xml", _annotation(stem, synset, size, written[stem]))

    train = [(s, f"{s}_{i + 1}", s, layout["sizes"][f"{s}_{i + 1}.JPEG"], i == 1)
             for s, n in layout["train"].items() for i in range(n - without_boxes)]
    archive(os.path.join(manual_dir, "ILSVRC2012_bbox_train_v2.tar.gz"), train)
    val = [("val", f"ILSVRC2012_val_{i + 1:08d}", s,
            layout["sizes"][f"ILSVRC2012_val_{i + 1:08d}.JPEG"], False)
           for i, s in enumerate(layout["validation"])]
    archive(os.path.join(manual_dir, "ILSVRC2012_bbox_val_v3.tgz"), val)
    return written


def imagenet_synsets():
    """TFDS's 1000 synset ids, in label order."""
    return _labels_file("labels.txt")


def imagenet_names():
    """The human-readable ImageNet class names in label order, as torchvision lists them
    (the same order as TFDS's sorted synsets)."""
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "vgg_jax", "data",
                           "imagenet_classes.txt")) as f:
        return [line.strip() for line in f]
