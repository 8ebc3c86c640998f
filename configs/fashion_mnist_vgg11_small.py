"""The d2l seed: VGG-11 with every conv's channels divided by 4, on Fashion-MNIST resized
to 224x224, lr 0.05, 10 epochs, batch 128 (grayscale: one input channel)."""
from configs import default


def get_config():
    c = default.get_config()
    c.model.update(arch="vgg11", width=0.25, fc_widths=(4096, 4096), classifier_pool=7,
                   init_scheme="glorot", dropout_rate=0.5)
    c.data.update(dataset="fashion_mnist", eval_split="test", channels=1, image_size=224,
                  recipe="small", pad=0, flip=False, normalization="unit")
    c.optim.update(batch_size=128, learning_rate=0.05, schedule="constant", warmup_epochs=0,
                   weight_decay=0.0)
    c.train.update(num_epochs=10, log_every_steps=50, checkpoint_every_steps=500)
    return c
