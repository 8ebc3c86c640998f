"""d2l's VGG experiment (Dive into Deep Learning, "Networks Using Blocks (VGG)", the
chapter the seed notes follow): VGG-11 with every conv's channels divided by 4, on
Fashion-MNIST resized to 224x224, one grey input channel, trained with `train_ch6`.

Every value the chapter and `train_ch6` fix is set here, nothing is inherited from
configs/default.py by accident: plain SGD (torch.optim.SGD(lr=0.05): no momentum, no
weight decay), lr 0.05 constant, batch 128, 10 epochs; Xavier-uniform conv and linear
weights, the biases left at PyTorch's default (`train_ch6` re-draws the weights only:
uniform on +-1/sqrt(fan_in), model.bias_init='torch'); two 4096-wide FC layers with
dropout 0.5 on the 7x7 pool5 map; pixels as ToTensor gives them ([0, 1]: mean 0, std
255); no augmentation; a full shuffle each epoch; test accuracy after every epoch. d2l's
published run ends near 0.92 test accuracy. One difference stays: the last 96 images of
each shuffled epoch (60,000 = 468 x 128 + 96) are not trained on here (whole batches
only), a 469th, smaller step there.
Fashion-MNIST prepares offline from its IDX files: `vgg-jax prepare fashion_mnist
--manual-dir DIR` (Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist).
"""
from vgg_jax.configs import default


def get_config():
    c = default.get_config()
    c.model.update(arch="vgg11", width=0.25, fc_widths=(4096, 4096), classifier_pool=7,
                   init_scheme="glorot", bias_init="torch", dropout_rate=0.5,
                   pool_ceil=False)
    c.data.update(dataset="fashion_mnist", train_split="train", eval_split="test", channels=1,
                  image_size=224, recipe="small", pad=0, flip=False, colour_pca=False,
                  normalization="custom", mean=(0.0,), std=(255.0,), bgr=False,
                  shuffle_buffer=60_000)
    c.optim.update(batch_size=128, grad_accum_steps=1, learning_rate=0.05, momentum=0.0,
                   nesterov=False, weight_decay=0.0, grad_clip_norm=0.0, schedule="constant",
                   warmup_epochs=0, freeze=())
    c.train.update(num_epochs=10, dtype="float32", eval_every_epochs=1, log_every_steps=50,
                   checkpoint_every_steps=500)
    c.eval.update(protocol="center", scales=())
    return c
