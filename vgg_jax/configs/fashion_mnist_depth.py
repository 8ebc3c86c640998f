"""The paper's Table 3 comparison (A, A-LRN, B, C, D, E) at small scale on Fashion-MNIST:
one recipe for every configuration, so that only the architecture differs
(`--config configs/fashion_mnist_depth.py:E`; bench/depth_fashion_mnist.py runs them all).

From the paper (Sec. 3.1, Table 1): the six conv stacks as published, SGD with momentum
0.9, weight decay 5e-4 (coupled, as Caffe), dropout 0.5 on fc6 and fc7, lr 1e-2 divided by
10 when it stops helping, Glorot initialisation (Sec. 3.1: the deep nets can be trained
from it without pre-training; A gets it too, so that init does not differ), random
horizontal flips, mean subtraction. What the small scale changes, and says so: every
conv's channels / 4 and fc6/fc7 512 wide; 28x28 images resized to 32x32 (S = 32, no crop:
five pools leave a 1x1 pool5); batch 128 for 60,000 images (the paper: 256 of 1.3M);
3 epochs with the divide at epoch 2 (too short for the paper's plateau rule); pixels also
divided by their std (Glorot assumes unit-variance inputs; the paper only subtracts the
mean); no colour shift (grey images); single-crop evaluation on the test split.
"""
from vgg_jax.configs import default

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 72.94, 90.02  # training split, pixel values


def get_config(arch: str = "A"):
    c = default.get_config()
    c.model.update(arch=arch, width=0.25, fc_widths=(512, 512), classifier_pool=1,
                   init_scheme="glorot", dropout_rate=0.5, pool_ceil=False)
    c.data.update(dataset="fashion_mnist", train_split="train", eval_split="test", channels=1,
                  image_size=32, recipe="small", pad=0, flip=True, colour_pca=False,
                  normalization="custom", mean=(FASHION_MNIST_MEAN,),
                  std=(FASHION_MNIST_STD,), bgr=False, shuffle_buffer=60_000)
    c.optim.update(batch_size=128, grad_accum_steps=1, learning_rate=1e-2, momentum=0.9,
                   nesterov=False, weight_decay=5e-4, weight_decay_mode="coupled",
                   decay_biases_and_bn=False, grad_clip_norm=0.0, schedule="step",
                   step_epochs=(2,), warmup_epochs=0, freeze=())
    c.train.update(num_epochs=3, dtype="float32", eval_every_epochs=1, log_every_steps=50,
                   checkpoint_every_steps=1000)
    c.eval.update(protocol="center", scales=())
    return c
