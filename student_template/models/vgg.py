"""VGG-19 for CIFAR-10, the network pruned in this lab.

Each number in ``cfg`` is a 3x3 convolution (no bias) followed by BatchNorm2d and
ReLU; each ``'M'`` is a 2x2 max-pool. After the convolutional part come a 2x2
average pool and a single Linear layer. Pass ``cfg`` to build a thinner network
(the pruned one); leave it out to get the full VGG-19.
"""
import torch
import torch.nn as nn

__all__ = ['vgg', 'defaultcfg']

# The full VGG-19 layout. Kept at module level so it can be swapped for a narrower one.
defaultcfg = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M',
              512, 512, 512, 512, 'M', 512, 512, 512, 512]


class vgg(nn.Module):
    def __init__(self, dataset='cifar10', init_weights=True, cfg=None):
        super(vgg, self).__init__()
        if cfg is None:
            cfg = defaultcfg
        self.cfg = list(cfg)
        self.feature = self.make_layers(self.cfg)
        num_classes = 10 if dataset == 'cifar10' else 100
        self.classifier = nn.Linear(self.cfg[-1], num_classes)
        if init_weights:
            self._initialize_weights()

    def make_layers(self, cfg):
        layers = []
        in_channels = 3
        for v in cfg:
            if v == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False))
                layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                in_channels = v
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.feature(x)
        x = nn.AvgPool2d(2)(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, (2.0 / fan_out) ** 0.5)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(0.5)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()


if __name__ == '__main__':
    net = vgg()
    out = net(torch.zeros(2, 3, 32, 32))
    print(out.shape, sum(p.numel() for p in net.parameters()))
