"""torchvision's own VGG (its `VGG` class, `make_layers` and `cfgs`, so its module and
state_dict key layout) for the parity tests. `width` scales the config's channel counts
and `fc` the classifier's hidden width, so tests can run small models: the classifier's
three Linear layers are then re-sized in place (same indices 0, 3, 6, same keys); at
width 1 and fc 4096 the module is exactly `torchvision.models.vggNN[_bn]()`."""
import torch
from torch import nn

from conftest import import_torchvision

import_torchvision()
from torchvision.models.vgg import VGG as TorchvisionVGG, cfgs, make_layers  # noqa: E402

LETTERS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def VGG(name, batch_norm=False, num_classes=1000, width=1.0, fc=4096, dropout=0.5):
    cfg = [v if v == "M" else max(1, int(round(v * width))) for v in cfgs[LETTERS[name]]]
    model = TorchvisionVGG(make_layers(cfg, batch_norm=batch_norm), num_classes=num_classes,
                           dropout=dropout)
    c = [v for v in cfg if v != "M"][-1]
    if (c, fc) != (512, 4096):
        model.classifier[0] = nn.Linear(c * 7 * 7, fc)
        model.classifier[3] = nn.Linear(fc, fc)
        model.classifier[6] = nn.Linear(fc, num_classes)
    return model


def randomize(model, seed=0):
    """Non-trivial weights: every parameter and BN running statistic random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model.eval()
