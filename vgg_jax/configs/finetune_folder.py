"""Fine-tune trained VGG weights on your own classes in an image folder.

    vgg-jax convert --arch vgg16 --from-torch vgg16-397923af.pth --out weights/vgg16
    python train.py --config configs/finetune_folder.py \\
        --config.train.init_from=weights/vgg16 --config.data.dataset=/data/flowers \\
        --workdir workdir/flowers
    # freeze the conv layers (train fc6..fc8 only): configs/finetune_folder.py:freeze

The folder is root/train/CLASS/*.jpg and root/val/CLASS/*.jpg (the torchvision
ImageFolder / imagenette layout). The model (arch, width, fc widths) and the pixel
convention come from the weights (`from_init`); every layer but fc8 is loaded and fc8 is
a new, randomly initialised layer with one output per class folder. The learning rate is
10x below the paper's from-scratch 1e-2, as is usual when the features are already good.
train.init_from may also be a training workdir of ours (its latest checkpoint).
"""
from vgg_jax.configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model.update(arch="from_init", num_classes=0, dropout_rate=0.5, init_scheme="glorot")
    c.data.update(dataset="", train_split="train", eval_split="val", image_size=224,
                  recipe="paper", s_min=256, s_max=256, eval_scale=256, flip=True,
                  colour_pca=False, normalization="from_init", shuffle_buffer=4096)
    c.optim.update(batch_size=32, learning_rate=1e-3, momentum=0.9, weight_decay=5e-4,
                   schedule="cosine", warmup_epochs=0,
                   freeze=("convs",) if "freeze" in arg.split(",") else ())
    c.train.update(num_epochs=10, init_from="", init_from_layers="all", init_exclude=("fc8",),
                   log_every_steps=10, checkpoint_every_steps=500)
    c.eval.batch_size = 64
    return c
