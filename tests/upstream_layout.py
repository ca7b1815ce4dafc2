"""RepDistiller/mdistiller checkpoints made from the hand-written fixtures of their published key layout (the
CIFAR-100 zoo's, and mdistiller's ImageNet MobileNetV1), and an independent functional forward of those tensors
under their own names.

A fixture (``fixtures/upstream_keys/<arch>.txt``) lists one tensor per line, ``name d1 d2 ...``; ``BN name c``
stands for a batch norm's weight, bias, running_mean, running_var (c each) and num_batches_tracked; a
``{a..b}`` in a name repeats the line for a..b. The forwards below follow the published networks' definitions
and read nothing of the toolkit's models, so a renaming rule that sends a tensor to the wrong place shows
up as different logits.
"""
import re
from pathlib import Path

import torch
import torch.nn.functional as F

FIXTURES = Path(__file__).parent / "fixtures" / "upstream_keys"
BN_PARTS = ("weight", "bias", "running_mean", "running_var")


def layout(arch: str) -> dict:
    """Tensor name -> shape of the upstream ``arch`` (CIFAR-100's 100 classes; MobileNetV1's 1000), in the
    fixture's order."""
    shapes = {}
    for line in (FIXTURES / f"{arch}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        bn = words[0] == "BN"
        name, dims = (words[1], words[2:]) if bn else (words[0], words[1:])
        found = re.search(r"\{(\d+)\.\.(\d+)\}", name)
        names = [name[:found.start()] + str(i) + name[found.end():] for i in range(int(found[1]), int(found[2]) + 1)] \
            if found else [name]
        for n in names:
            if bn:
                shapes.update({f"{n}.{part}": (int(dims[0]),) for part in BN_PARTS})
                shapes[f"{n}.num_batches_tracked"] = ()
            else:
                shapes[n] = tuple(int(d) for d in dims)
    return shapes


def parameter_count(shapes: dict) -> int:
    """Trainable parameters of a layout: every tensor but batch-norm statistics."""
    return sum(torch.Size(s).numel() for k, s in shapes.items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def random_state(shapes: dict, seed: int) -> dict:
    """Seeded tensors for a layout: fan-in scaled weights, non-trivial batch-norm affine and statistics."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(240 * 390)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("running_mean", "bias")):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # a batch norm's weight
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = torch.Size(shape[1:]).numel()
            state[name] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return state


def bn(x, w, p):
    """Batch norm ``p`` in eval mode."""
    return F.batch_norm(x, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"],
                        False, 0.0, 1e-5)


def conv(x, w, p, stride=1, groups=1):
    """Convolution ``p`` (its bias if it has one), padded to keep the size at stride 1."""
    k = w[f"{p}.weight"]
    return F.conv2d(x, k, w.get(f"{p}.bias"), stride, k.shape[-1] // 2, 1, groups)


def blocks(w, prefix):
    """The block indices under ``prefix`` (``layer1`` -> 0, 1, ...)."""
    return sorted({int(k[len(prefix) + 1:].split(".")[0]) for k in w if k.startswith(prefix + ".")})


def classify(x, w, p):
    """Global average pool and linear layer ``p``."""
    return F.linear(x.mean((2, 3)), w[f"{p}.weight"], w[f"{p}.bias"])


def shuffle(x, g):
    """Channel shuffle of ``g`` groups as the ShuffleNets define it."""
    n, c, h, wd = x.shape
    return x.view(n, g, c // g, h, wd).permute(0, 2, 1, 3, 4).reshape(n, c, h, wd)


def resnet(w, x):
    """RepDistiller's CIFAR ResNet (``resnet.py``): post-activation BasicBlocks."""
    x = F.relu(bn(conv(x, w, "conv1"), w, "bn1"))
    for L in (1, 2, 3):
        for b in blocks(w, f"layer{L}"):
            p, s = f"layer{L}.{b}", 2 if L > 1 and b == 0 else 1
            out = bn(conv(F.relu(bn(conv(x, w, f"{p}.conv1", s), w, f"{p}.bn1")), w, f"{p}.conv2"), w, f"{p}.bn2")
            sc = bn(conv(x, w, f"{p}.downsample.0", s), w, f"{p}.downsample.1") if f"{p}.downsample.0.weight" in w else x
            x = F.relu(out + sc)
    return classify(x, w, "fc")


def wrn(w, x):
    """RepDistiller's WideResNet (``wrn.py``): pre-activation blocks, the shortcut on the activated input."""
    x = conv(x, w, "conv1")
    for L in (1, 2, 3):
        for b in blocks(w, f"block{L}.layer"):
            p, s = f"block{L}.layer.{b}", 2 if L > 1 and b == 0 else 1
            act = F.relu(bn(x, w, f"{p}.bn1"))
            out = conv(F.relu(bn(conv(act, w, f"{p}.conv1", s), w, f"{p}.bn2")), w, f"{p}.conv2")
            x = out + (conv(act, w, f"{p}.convShortcut", s) if f"{p}.convShortcut.weight" in w else x)
    return classify(F.relu(bn(x, w, "bn1")), w, "fc")


def vgg(w, x):
    """RepDistiller's VGG (``vgg.py``) at 32 px: max-pools after blocks 0-2 only."""
    for b in range(5):
        for j in sorted({int(k.split(".")[1]) for k in w if k.startswith(f"block{b}.")})[::2]:
            x = F.relu(bn(conv(x, w, f"block{b}.{j}"), w, f"block{b}.{j + 1}"))
        x = F.max_pool2d(x, 2) if b < 3 else x
    return classify(x, w, "classifier")


def mobilenet(w, x):
    """RepDistiller's MobileNetV2 (``mobilenetv2.py``): first strides 1, 1, 2, 2, 1, 2, 1 per group."""
    x = F.relu(bn(conv(x, w, "conv1.0", 2), w, "conv1.1"))
    for g, first in enumerate((1, 1, 2, 2, 1, 2, 1)):
        for b in blocks(w, f"blocks.{g}"):
            p, s = f"blocks.{g}.{b}.conv", first if b == 0 else 1
            h = F.relu(bn(conv(x, w, f"{p}.0"), w, f"{p}.1"))
            h = F.relu(bn(conv(h, w, f"{p}.3", s, groups=h.shape[1]), w, f"{p}.4"))
            h = bn(conv(h, w, f"{p}.6"), w, f"{p}.7")
            x = x + h if s == 1 and h.shape == x.shape else h
    return classify(F.relu(bn(conv(x, w, "conv2.0"), w, "conv2.1")), w, "classifier.0")


def shuffle_v1(w, x):
    """RepDistiller's ShuffleV1 (``ShuffleNetv1.py``): groups read from the weights' shapes."""
    x = F.relu(bn(conv(x, w, "conv1"), w, "bn1"))
    for L in (1, 2, 3):
        for b in blocks(w, f"layer{L}"):
            p, s = f"layer{L}.{b}", 2 if b == 0 else 1
            g1 = x.shape[1] // w[f"{p}.conv1.weight"].shape[1]
            out = shuffle(F.relu(bn(conv(x, w, f"{p}.conv1", groups=g1), w, f"{p}.bn1")), g1)
            out = F.relu(bn(conv(out, w, f"{p}.conv2", s, groups=out.shape[1]), w, f"{p}.bn2"))
            out = bn(conv(out, w, f"{p}.conv3", groups=out.shape[1] // w[f"{p}.conv3.weight"].shape[1]), w, f"{p}.bn3")
            x = F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if s == 2 else out + x)
    return classify(x, w, "linear")


def shuffle_v2(w, x):
    """RepDistiller's ShuffleV2 (``ShuffleNetv2.py``): DownBlock then BasicBlocks on the second half."""
    x = F.relu(bn(conv(x, w, "conv1"), w, "bn1"))
    for L in (1, 2, 3):
        for b in blocks(w, f"layer{L}"):
            p = f"layer{L}.{b}"
            if b == 0:
                left = bn(conv(x, w, f"{p}.conv1", 2, groups=x.shape[1]), w, f"{p}.bn1")
                left = F.relu(bn(conv(left, w, f"{p}.conv2"), w, f"{p}.bn2"))
                right = F.relu(bn(conv(x, w, f"{p}.conv3"), w, f"{p}.bn3"))
                right = bn(conv(right, w, f"{p}.conv4", 2, groups=right.shape[1]), w, f"{p}.bn4")
                x = shuffle(torch.cat([left, F.relu(bn(conv(right, w, f"{p}.conv5"), w, f"{p}.bn5"))], 1), 2)
                continue
            c = x.shape[1] // 2
            out = F.relu(bn(conv(x[:, c:], w, f"{p}.conv1"), w, f"{p}.bn1"))
            out = bn(conv(out, w, f"{p}.conv2", groups=c), w, f"{p}.bn2")
            x = shuffle(torch.cat([x[:, :c], F.relu(bn(conv(out, w, f"{p}.conv3"), w, f"{p}.bn3"))], 1), 2)
    return classify(F.relu(bn(conv(x, w, "conv2"), w, "bn2")), w, "linear")


def resnet50(w, x):
    """RepDistiller's ``resnetv2`` ResNet50: Bottlenecks, the stride on the 3x3 conv."""
    x = F.relu(bn(conv(x, w, "conv1"), w, "bn1"))
    for L in (1, 2, 3, 4):
        for b in blocks(w, f"layer{L}"):
            p, s = f"layer{L}.{b}", 2 if L > 1 and b == 0 else 1
            out = F.relu(bn(conv(x, w, f"{p}.conv1"), w, f"{p}.bn1"))
            out = F.relu(bn(conv(out, w, f"{p}.conv2", s), w, f"{p}.bn2"))
            out = bn(conv(out, w, f"{p}.conv3"), w, f"{p}.bn3")
            sc = bn(conv(x, w, f"{p}.shortcut.0", s), w, f"{p}.shortcut.1") if f"{p}.shortcut.0.weight" in w else x
            x = F.relu(out + sc)
    return classify(x, w, "linear")


def mobilenet_v1(w, x):
    """mdistiller's ImageNet MobileNetV1 (``imagenet/mobilenetv1.py``): depthwise-separable blocks; its
    ``AvgPool2d(7)`` is global average pooling at 224 px, and global here at any size."""
    x = F.relu(bn(conv(x, w, "model.0.0", 2), w, "model.0.1"))
    for i, s in enumerate((1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1), start=1):
        x = F.relu(bn(conv(x, w, f"model.{i}.0", s, groups=x.shape[1]), w, f"model.{i}.1"))
        x = F.relu(bn(conv(x, w, f"model.{i}.3"), w, f"model.{i}.4"))
    return classify(x, w, "fc")


def forward_of(arch: str):
    """The independent forward of upstream ``arch``."""
    if arch.startswith("resnet"):
        return resnet
    if arch.startswith("wrn"):
        return wrn
    if arch.startswith("vgg"):
        return vgg
    return {"MobileNetV2": mobilenet, "ShuffleV1": shuffle_v1, "ShuffleV2": shuffle_v2, "ResNet50": resnet50,
            "MobileNetV1": mobilenet_v1}[arch]
