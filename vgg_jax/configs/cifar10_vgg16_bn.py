"""The seed notes' CIFAR-10 experiment (Fingsinz/StyleTransfer,
src/01.ref_and_note/04.VGG.py, 2025-03-05): VGG-16 with BatchNorm after every conv on
32x32 CIFAR-10, pool5 averaged to 7x7 into two 4096-wide FC layers with dropout 0.5.

Every value that script fixes is set here: SGD lr 0.001, momentum 0.9, weight decay 5e-4
on every parameter (torch's coupled form), lr / 10 every 30 epochs (StepLR), 50 epochs,
batch 128; RandomCrop(32, padding=4) and horizontal flips; Normalize with mean (0.4914,
0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010) on [0, 1] pixels; test every 5 epochs.
One difference stays: the script keeps PyTorch's default layer init (uniform, variance
1/(3 fan_in)), which vgg_jax does not offer; 'kaiming' (He normal) is used. TFDS
`cifar10` must be prepared beforehand (`tfds build cifar10` where the network is available).
"""
from vgg_jax.configs import default

CIFAR10_MEAN = tuple(255 * m for m in (0.4914, 0.4822, 0.4465))  # 0..255 pixels
CIFAR10_STD = tuple(255 * s for s in (0.2023, 0.1994, 0.2010))


def get_config():
    c = default.get_config()
    c.model.update(arch="vgg16_bn", width=1.0, fc_widths=(4096, 4096), classifier_pool=7,
                   init_scheme="kaiming", dropout_rate=0.5, pool_ceil=False)
    c.data.update(dataset="cifar10", train_split="train", eval_split="test", channels=3,
                  image_size=32, recipe="small", pad=4, flip=True, colour_pca=False,
                  normalization="custom", mean=CIFAR10_MEAN, std=CIFAR10_STD, bgr=False)
    c.optim.update(batch_size=128, grad_accum_steps=1, learning_rate=0.001, momentum=0.9,
                   nesterov=False, weight_decay=5e-4, weight_decay_mode="coupled",
                   decay_biases_and_bn=True, grad_clip_norm=0.0, schedule="step",
                   step_epochs=(30,), warmup_epochs=0, freeze=())
    c.train.update(num_epochs=50, dtype="float32", eval_every_epochs=5, log_every_steps=100,
                   checkpoint_every_steps=1000)
    c.eval.update(protocol="center", scales=())
    return c
