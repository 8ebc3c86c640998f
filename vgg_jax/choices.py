"""Every option that takes one of a fixed set of values, listed once. Config validation,
the command-line `choices` and the error messages all read these (`errors.check_choice`).
Imports nothing, so that every module (the CLI's parser, configs, models) can read it
without an import cycle."""

PROTOCOLS = ("center", "dense", "multicrop", "dense+multicrop")   # Sec. 3.2 (evaluate)
CONV_IMPLS = ("auto", "xla", "im2col", "winograd", "winograd4")  # conv algorithms (conv)
BOX_HEADS = ("", "scr", "pcr")  # a classifier, or Appendix A's box nets (models, objectives)
RECIPES = ("paper", "small")                                       # training crops (preprocess)
# Pixel conventions (preprocess.NORMALIZATIONS), plus 'custom' (data.mean / data.std) and,
# in training configs, 'from_init' (those of train.init_from's weights).
NORMALIZATIONS = ("paper", "torchvision", "caffe", "unit")
SCHEDULES = ("paper", "step", "cosine", "constant")                # learning rate (optim)
WEIGHT_DECAY_MODES = ("coupled", "decoupled")                      # optim
INIT_SCHEMES = ("paper", "paper_literal", "glorot", "kaiming", "he")  # models
BIAS_INITS = ("zeros", "torch")                                    # models
DTYPES = ("float32", "bfloat16")                                   # train.dtype
INIT_FROM_LAYERS = ("all", "paper")                                # or a list of layer names
EMBED_METHODS = ("pca", "tsne")                                    # plots
EMBED_PROTOCOLS = ("center", "paper")                              # embed: crop | Appendix B
AGGREGATES = ("average", "stack")                                  # Appendix B over scales
