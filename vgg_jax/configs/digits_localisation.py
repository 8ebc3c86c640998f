"""Localisation (Appendix A) on the bundled canvas digits, `vgg_digits_canvas`: the
paper's box net at the test suite's size. `--config digits_localisation:SCR` (one box for
all classes) or `:PCR` (a box per class).

As the paper: trained like the classification net (the same crops and flips, which the
boxes follow) with a Euclidean loss on the box (cx, cy, w, h); a single training scale; a
box correct when its IoU with the ground truth exceeds 0.5, counted on the centre view with
the true class's box (the paper's first protocol). Unlike the paper, which starts from the
classification net of the same scale, this trains from scratch: the bundled classifier
sees 32x32 digits, not 64x64 canvases (set train.init_from and
--config.train.init_exclude=fc8 to start from a classification run, as the paper does).
pool5 (2x2 at 64x64) keeps its places (model.classifier_pool=2): averaged to 1x1, as the
digits classifier does, it would no longer say where the digit is. No dropout: with the
classifier's 0.5 on this 256-wide net the regression stays at the mean box (17.8% correct
after 12 epochs on 2026-12-07, against 94.7% after 8 without; bench/RESULTS.md).
"""
from vgg_jax.configs import default


def get_config(arg: str = "SCR"):
    c = default.get_config()
    c.model.update(box_head=arg.lower(), classifier_pool=2, dropout_rate=0.0)
    c.data.update(dataset="vgg_digits_canvas", image_size=64, recipe="small", pad=4,
                  flip=True)
    c.train.num_epochs = 10
    return c
