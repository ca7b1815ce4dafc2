"""The shape every model in the registry shares, so heads and baselines can treat them alike.

A model is ``stem -> stages[0..k-1] -> tail -> global average pool -> (dropout) -> fc``. The output of each
stage is a mount point: DIH heads, FitNets hints, AT maps, TOFD and MHKD classifiers all attach there.
``head_pool`` says how a DIH head reads a mount point of this network: ``None``, flattened as the paper's
CIFAR heads; ``p``, average-pooled to ``p x p`` first (the ImageNet-layout networks, docs/IMAGENET.md).
"""
import torch
from torch import nn

# What DIH heads on the ImageNet-layout networks average-pool each mount point to: 1, global average pooling,
# the form of these networks' own classifier (docs/IMAGENET.md#heads-that-pool).
IMAGENET_HEAD_POOL = 1


class StagedNet(nn.Module):
    """A classifier built from a stem, k mount-point stages, a tail and a linear classifier."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], tail: nn.Module, width: int, num_classes: int,
                 dropout: float = 0.0, head_pool: int | None = None):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.tail = tail
        self.pool = nn.AdaptiveAvgPool2d(1)
        # Before the classifier, as torchvision's MobileNetV2 has it; no weights, so no state-dict key.
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(width, num_classes)
        self.num_classes = num_classes
        self.embedding_dim = width
        self.head_pool = head_pool

    @property
    def num_stages(self) -> int:
        """Number of mount points (k)."""
        return len(self.stages)

    def forward(self, x: torch.Tensor, features: bool = False):
        """Logits, or with ``features=True`` the triple (logits, [k stage outputs], pooled embedding)."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        emb = torch.flatten(self.pool(self.tail(x)), 1)
        logits = self.fc(self.dropout(emb))
        if features:
            return logits, feats, emb
        return logits

    def forward_from(self, index: int, feat: torch.Tensor) -> torch.Tensor:
        """Logits computed from the output of stage ``index`` onwards (used by deep auxiliary classifiers)."""
        x = feat
        for stage in self.stages[index + 1:]:
            x = stage(x)
        return self.fc(self.dropout(torch.flatten(self.pool(self.tail(x)), 1)))


def conv_bn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1,
                 act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Convolution (no bias, padded to keep the size at stride 1), batch norm, activation (ReLU by default)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act(inplace=True))


def init_weights(model: nn.Module) -> nn.Module:
    """He-normal convolutions, unit batch norm, default linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
