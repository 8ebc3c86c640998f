"""The paper's ImageNet recipes (Sec. 3.1). Pick the net and training scale with the
config argument: `--config configs/imagenet.py:D,256`, `:D,384` or `:D,256-512`.

S=256: lr 1e-2 from scratch (net A: the paper's N(0, 0.01) init; deeper nets: glorot, or
  pre-initialise from a trained A with --config.train.init_from=WORKDIR_A
  --config.train.init_from_layers=paper).
S=384: initialised from the S=256 net, lr 1e-3 (set train.init_from; refused without it).
S in [256, 512] (scale jittering): fine-tuned from the S=384 net (the same).
Weight decay: not on biases (nor BN), as Caffe's ImageNet example (decay_mult 0), which the
paper's Caffe code followed; the paper itself is silent.
Data: TFDS imagenet2012, prepared by hand (see README): ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in ~/tensorflow_datasets/downloads/manual.
"""
from vgg_jax.configs import default


def get_config(arg: str = "D,256"):
    arch, scale = (arg.split(",") + ["256"])[:2]
    c = default.get_config()
    c.model.update(arch=arch, width=1.0, fc_widths=(4096, 4096), classifier_pool=7,
                   init_scheme="paper" if arch.upper() in ("A", "A-LRN") else "glorot")
    c.data.update(dataset="imagenet2012", train_split="train", eval_split="validation",
                  image_size=224, recipe="paper", flip=True, colour_pca=True,
                  normalization="paper", shuffle_buffer=16_384)
    if "-" in scale:
        s_min, s_max = (int(s) for s in scale.split("-"))
        c.data.update(s_min=s_min, s_max=s_max, eval_scale=(s_min + s_max) // 2)  # Q=384
    else:
        c.data.update(s_min=int(scale), s_max=int(scale), eval_scale=int(scale))
    c.optim.update(batch_size=256, learning_rate=1e-2 if scale == "256" else 1e-3,
                   momentum=0.9, weight_decay=5e-4, weight_decay_mode="coupled",
                   schedule="paper", warmup_epochs=0, plateau_patience=2, plateau_max_decays=3,
                   decay_biases_and_bn=False)
    if scale != "256":  # Sec. 3.1: S=384 from the S=256 net, S in [256, 512] from S=384
        c.train.init_from_required = (f"the S={'256' if scale == '384' else '384'} {arch} "
                                      f"run")
    c.train.update(num_epochs=74, log_every_steps=100, checkpoint_every_steps=2000,
                   keep_checkpoints=3)
    c.eval.batch_size = 256
    return c
