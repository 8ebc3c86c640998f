"""`imagenet2012_localisation`: ILSVRC-2012's images with their object boxes, the data of
the paper's localisation nets (Appendix A), prepared offline from the official archives
through the TFDS builder API, as TFDS prepares `imagenet2012`.

The manual directory holds the two image tars of `imagenet2012` and the two box archives:
ILSVRC2012_bbox_train_v2.tar.gz (`SYNSET/SYNSET_N.xml`, boxes for 544,546 of the training
images) and ILSVRC2012_bbox_val_v3.tgz (`val/ILSVRC2012_val_N.xml`, all 50,000), each XML in
PASCAL VOC's layout (<size> and one <object> per box, <bndbox> in pixels). The train split
keeps the training images that have boxes (the paper trains its box nets on them); the
validation split is all of the validation images. Labels are TFDS `imagenet2012`'s (the
same 1000 classes in the same order, the validation ground truth from TFDS's copy); boxes
are BBoxFeature's (ymin, xmin, ymax, xmax) fractions of the size the XML gives, clipped to
the image, only those of the image's class.
"""
from __future__ import annotations

import io
import os
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
from tensorflow_datasets.datasets.imagenet2012.imagenet2012_dataset_builder import (CMYK_IMAGES,
                                                                                      PNG_IMAGES)

TRAIN_IMAGES, VAL_IMAGES = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
TRAIN_BOXES, VAL_BOXES = "ILSVRC2012_bbox_train_v2.tar.gz", "ILSVRC2012_bbox_val_v3.tgz"
ARCHIVES = (TRAIN_IMAGES, VAL_IMAGES, TRAIN_BOXES, VAL_BOXES)


def parse_annotation(xml: bytes) -> list[tuple[str, np.ndarray]]:
    """One PASCAL VOC annotation -> [(synset, (ymin, xmin, ymax, xmax) fractions)], the
    pixels divided by the <size> it states and clipped to [0, 1]."""
    root = ET.fromstring(xml)
    size = root.find("size")
    w, h = float(size.findtext("width")), float(size.findtext("height"))
    out = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        x0, y0, x1, y1 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        box = np.clip(np.array([y0 / h, x0 / w, y1 / h, x1 / w]), 0.0, 1.0)
        box[2:] = np.maximum(box[2:], box[:2])  # a degenerate box stays empty, not inverted
        out.append((obj.findtext("name").strip(), box))
    return out


def read_boxes(path: str) -> dict[str, list[tuple[str, np.ndarray]]]:
    """A box archive -> {image name without extension: its objects}."""
    out = {}
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xml"):
                stem = os.path.splitext(os.path.basename(member.name))[0]
                out[stem] = parse_annotation(tar.extractfile(member).read())
    return out


def _fixed(file_name: str, image):
    """TFDS imagenet2012's repairs: its CMYK JPEGs to RGB, its one PNG to JPEG."""
    if file_name in CMYK_IMAGES:
        return io.BytesIO(tfds.core.utils.jpeg_cmyk_to_rgb(image.read()))
    if file_name in PNG_IMAGES:
        return io.BytesIO(tfds.core.utils.png_to_jpeg(image.read()))
    return image


class Imagenet2012Localisation(tfds.core.GeneratorBasedBuilder):
    """ILSVRC-2012 images with their object boxes (train: the images with boxes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"manual_dir should contain {', '.join(ARCHIVES[:-1])} and {ARCHIVES[-1]}, as "
        f"downloaded from https://image-net.org/download-images (after registering).")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()),
                "file_name": tfds.features.Text(),
                "bboxes": tfds.features.Sequence(tfds.features.BBoxFeature()),
            }),
            supervised_keys=("image", "label"),
            homepage="https://image-net.org/",
        )

    def _split_generators(self, dl_manager):
        manual = dl_manager.manual_dir
        path = lambda name: os.path.join(manual, name)
        return {
            "train": self._generate_examples(path(TRAIN_IMAGES), path(TRAIN_BOXES), True),
            "validation": self._generate_examples(path(VAL_IMAGES), path(VAL_BOXES), False),
        }

    def _generate_examples(self, images: str, boxes: str, train: bool):
        boxes = read_boxes(boxes)
        yield from (self._train(images, boxes) if train else self._validation(images, boxes))

    def _record(self, file_name, image, label, objects):
        return {"file_name": file_name, "image": _fixed(file_name, image), "label": label,
                "bboxes": [tfds.features.BBox(*map(float, box)) for synset, box in objects
                           if synset == label]}

    def _train(self, archive: str, boxes):
        with tarfile.open(archive, "r|") as outer:  # a tar of one tar per synset
            for member in outer:
                label = os.path.splitext(os.path.basename(member.name))[0]
                inner = io.BytesIO(outer.extractfile(member).read())
                with tarfile.open(fileobj=inner, mode="r|") as tar:
                    for image in tar:
                        stem = os.path.splitext(image.name)[0]
                        if image.isfile() and stem in boxes:
                            yield image.name, self._record(image.name, tar.extractfile(image),
                                                           label, boxes[stem])

    def _validation(self, archive: str, boxes):
        labels = imagenet_common.get_validation_labels(archive)
        with tarfile.open(archive, "r|") as tar:
            for image in tar:
                if image.isfile():
                    yield image.name, self._record(image.name, tar.extractfile(image),
                                                   labels[image.name],
                                                   boxes.get(os.path.splitext(image.name)[0], []))
