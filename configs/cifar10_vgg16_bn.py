"""The seed notes' CIFAR-10 VGG-16 with BatchNorm after every conv (32x32 inputs, a small
classifier, pad-and-crop + flip). TFDS `cifar10` must be prepared beforehand
(`tfds build cifar10` where the network is available)."""
from configs import default

CIFAR10_MEAN = (125.31, 122.95, 113.87)  # per-channel, 0..255 pixels
CIFAR10_STD = (62.99, 62.09, 66.70)


def get_config():
    c = default.get_config()
    c.model.update(arch="vgg16_bn", width=1.0, fc_widths=(512, 512), classifier_pool=1,
                   init_scheme="kaiming")
    c.data.update(dataset="cifar10", eval_split="test", image_size=32, recipe="small", pad=4,
                  flip=True, normalization="custom", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    c.optim.update(batch_size=128, learning_rate=0.05, schedule="cosine", warmup_epochs=1)
    c.train.update(num_epochs=100, log_every_steps=100, checkpoint_every_steps=1000)
    return c
