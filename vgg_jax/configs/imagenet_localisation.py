"""The paper's localisation nets (Appendix A) on ImageNet: configuration D with fc8
predicting boxes. `--config imagenet_localisation:PCR,256` (a box per class) or `:SCR,384`
(one box for all classes); `,fc` fine-tunes only the fully-connected layers (the convs
frozen: Table 8's "first two FC layers" variant, fc8 being the new box layer).

As Appendix A fixes: trained like the classification net (Sec. 3.1: the same batch,
momentum, weight decay, dropout, crops, flips and colour shift; the boxes follow the crops
and flips) with a Euclidean loss on the box (cx, cy, w, h) in place of the soft-max; one
training scale S = 256 or 384 (no jittering); initialised from the classification net
trained at the same scale (`train.init_from`, refused without it), its fc8 left out (the box
layer starts from scratch); initial learning rate 1e-3. Validation: the centre crop with the
true class's box (the first protocol); `vgg-jax evaluate --task localisation --protocol
dense --classifier CLS` gives Table 9's dense error.
Data: `imagenet2012_localisation` (vgg_jax.datasets.imagenet_localisation), prepared by
`vgg-jax prepare` from the image tars and the official box archives.
"""
from vgg_jax.configs import imagenet

SCALES = (256, 384)


def get_config(arg: str = "PCR,256"):
    parts = [p.strip() for p in arg.split(",")]
    head, scale, rest = parts[0].lower(), int((parts[1:] or ["256"])[0]), parts[2:]
    if head not in ("scr", "pcr") or scale not in SCALES or rest not in ([], ["fc"]):
        raise ValueError(f"imagenet_localisation takes SCR|PCR,S[,fc] with S in {SCALES} "
                         f"(Appendix A), got {arg!r}")
    c = imagenet.get_config(f"D,{scale}")
    c.model.box_head = head
    c.data.dataset = "imagenet2012_localisation"
    c.optim.learning_rate = 1e-3
    c.optim.freeze = ("convs",) if rest else ()
    c.train.init_from_required = f"the S={scale} D classification run"
    c.train.init_exclude = ("fc8",)
    c.eval.protocol = "center"
    return c
