"""Default: VGG-11 with BN at a quarter width on the bundled digits dataset (32x32).

Small enough to train on two CPU cores in a few minutes to >= 90% test accuracy; every
other config starts from this one and changes what differs.
"""
import ml_collections

from vgg_jax import preprocess


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        arch="vgg11_bn",
        width=0.25,              # channels x 1/4 (the d2l seed's small VGG-11)
        fc_widths=(256, 256),    # CIFAR-style small classifier
        dropout_rate=0.5,        # Sec. 3.1
        # paper | paper_literal | glorot | kaiming | he. N(0, 0.01) fc layers (paper, kaiming)
        # shrink a 256-wide classifier's signal ~250x; glorot scales with the width.
        init_scheme="glorot",
        bias_init="zeros",       # the paper's; 'torch': PyTorch's default U(+-1/sqrt(fan_in))
        conv_impl="auto",        # XLA's conv on GPU/TPU; per layer on CPU (models.conv_plan)
        classifier_pool=1,       # pool5 -> 1x1 -> fc6 (7 = the paper / torchvision)
        pool_ceil=False,         # Caffe's ceil-mode pools (original Caffe weights, dense eval)
        num_classes=0,           # 0: from the dataset
        box_head="",             # '' classifier | 'scr' / 'pcr': Appendix A's box net
    ))

    c.data = ml_collections.ConfigDict(dict(
        dataset="vgg_digits",    # a TFDS name, or an image folder (root/class/*.jpg)
        data_dir="",             # TFDS data dir ('' -> $TFDS_DATA_DIR or ~/tensorflow_datasets)
        train_split="train",
        eval_split="test",
        channels=3,
        image_size=32,           # crop fed to the net (224 in the paper)
        recipe="small",          # 'paper' (Sec. 3.1) | 'small' (resize, pad-and-crop)
        s_min=256, s_max=256,    # training scale S; s_min < s_max: scale jittering
        eval_scale=256,          # Q for centre-crop eval in the 'paper' recipe
        fused_jpeg_crop=True,    # decode only the crop window of JPEGs
        # Training resize: plain bilinear (as OpenCV / Caffe and tf.image.resize's
        # default); True antialiases when shrinking (PIL-style), ~2.5x the host time.
        antialias=False,
        pad=4,
        flip=False,              # digits are not mirror-symmetric
        colour_pca=False,
        pca_std=0.1,
        pca_eigval=preprocess.IMAGENET_EIGVAL,
        pca_eigvec=preprocess.IMAGENET_EIGVEC,
        normalization="unit",    # paper | torchvision | caffe | unit | custom
        mean=(127.5,), std=(127.5,), bgr=False,  # used by 'custom'
        shuffle_buffer=10_000,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        batch_size=64,           # global; 256 in the paper
        grad_accum_steps=1,
        learning_rate=0.02,
        momentum=0.9,            # Sec. 3.1
        nesterov=False,
        weight_decay=5e-4,       # Sec. 3.1
        weight_decay_mode="coupled",  # coupled (Caffe / torch SGD) | decoupled
        decay_biases_and_bn=True,  # the paper is silent; small nets here regularise them
        grad_clip_norm=0.0,      # 0: off
        schedule="cosine",       # paper (reduce on plateau) | step | cosine | constant
        warmup_epochs=0.5,
        step_epochs=(),          # for 'step': epochs at which lr /= 10
        plateau_patience=2,      # for 'paper': evals without improvement before lr /= 10
        plateau_max_decays=3,    # the paper decreased it 3 times
        freeze=(),               # layer names whose params stay fixed (fine-tuning)
    ))

    c.train = ml_collections.ConfigDict(dict(
        num_epochs=12,
        dtype="float32",         # compute dtype: float32 | bfloat16 (params stay float32)
        log_every_steps=20,
        eval_every_epochs=1,
        checkpoint_every_steps=200,
        keep_checkpoints=2,      # last K, plus the best by validation top-1
        init_from="",            # checkpoint / weights dir, or published weights (keras:vgg16)
        init_from_layers="all",  # all | paper (conv1..4 + fc6..8 of net A) | comma list
        init_from_required="",   # a config that fine-tunes names here the run to start from
        init_exclude=(),         # layers not to load, e.g. ('fc8',) or on the command line
                                 # --config.train.init_exclude=fc8,fc7
        distributed=False,       # jax.distributed.initialize() (multi-host)
        coordinator_address="",  # with distributed: host:port; '' -> found by JAX (TPU, SLURM)
        num_processes=0,         # with coordinator_address: how many processes
        process_id=-1,           # with coordinator_address: this one's index
        max_steps=0,             # 0: num_epochs * steps_per_epoch
        allow_config_change=False,  # resume a workdir although the config changed (run
                                 # length, logging and the like may change without it)
        progress_bar=True,
        compile_cache="",        # JAX's persistent compile cache: '' -> ~/.cache/vgg_jax/jax,
                                 # a folder, or 'off' (wins over $VGG_JAX_COMPILE_CACHE)
        weights_cache="",        # published weights (init_from=torchvision:vgg16) are
                                 # kept here; '' -> $VGG_JAX_CACHE or ~/.cache/vgg_jax
        workdir_lease_s=60.0,    # gs:// workdirs: a killed run's lease expires after this
    ))

    c.eval = ml_collections.ConfigDict(dict(
        protocol="center",       # center | dense | multicrop | dense+multicrop
        batch_size=128,          # global (over processes), as optim.batch_size
        scales=(),               # test scales Q; () -> data.eval_scale (the crop for
                                 # 'small'); --config.eval.scales=256,384,512 for several
    ))
    return c
