"""Training configs (ml_collections), one module per recipe, each with `get_config([arg])`.

Addressed by name on the command line (`vgg-jax train --config imagenet:D,256`, or
`python train.py --config configs/imagenet.py:D,256` in the repository, whose configs/ files
point here): default, imagenet, cifar10_vgg16_bn, fashion_mnist_vgg11_small,
fashion_mnist_depth, finetune_folder, digits_localisation (Appendix A's box
nets on the bundled canvas digits).
"""
