"""Image classifiers for evaluation: feature extractor for FID on small data, rejection scores, and
the Classification Accuracy Score (a classifier trained on samples only, tested on real images).

``small_resnet`` is a CIFAR-style ResNet for small images (the digits preset); ``resnet50`` is
torchvision's, randomly initialised (CAS trains from scratch, as in the VQ-VAE-2 paper).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Fp32BatchNorm2d(nn.BatchNorm2d):
    """Batch norm computed in fp32 whatever the parameters' dtype, as autocast does. DeepSpeed's bf16
    casts a module's parameters but not its buffers, and batch_norm refuses bf16 weights with fp32
    running statistics; the statistics also stay exact this way. Same state_dict as nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or self.running_mean is None
        stats = not self.training or self.track_running_stats
        out = F.batch_norm(x.float(), self.running_mean if stats else None, self.running_var if stats else None,
                           None if self.weight is None else self.weight.float(),
                           None if self.bias is None else self.bias.float(), batch_stats, momentum, self.eps)
        return out.to(x.dtype)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class Classifier(nn.Module):
    """``forward`` gives logits; ``features_and_logits`` also the penultimate (pooled) features."""

    def __init__(self, *, num_classes: int, arch: str = "small_resnet", widths: list[int] | None = None,
                 blocks: int = 1):
        super().__init__()
        if arch == "small_resnet":
            widths = list(widths or [32, 64, 128])
            layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                       nn.ReLU()]
            cin = widths[0]
            for i, w in enumerate(widths):
                for b in range(blocks):
                    layers.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                    cin = w
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(cin, num_classes)
        elif arch == "resnet50":
            from torchvision.models import resnet50

            net = resnet50(weights=None, num_classes=num_classes)
            self.head, net.fc = net.fc, nn.Identity()
            self.body = net
        else:
            raise ValueError(f"model.classifier.arch={arch}: choose small_resnet or resnet50")
        for m in self.modules():  # torchvision's too; the swap keeps the parameters and state_dict keys
            if type(m) is nn.BatchNorm2d:
                m.__class__ = Fp32BatchNorm2d
        self.num_classes = num_classes

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats, self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
