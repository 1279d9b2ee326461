"""LeNet-5-style convolutional network."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


class LeNet5(nn.Sequential):
    """LeNet-5-style CNN: conv(6,5×5) → ReLU → maxpool → conv(16,5×5) → ReLU → maxpool → 120 → 84 → n.

    Args:
        in_channels: image channels (1 for (Fashion-)MNIST, 3 for CIFAR).
        num_classes: outputs.
        image_size: input height/width (28 for MNIST-format, 32 for CIFAR; 8 for sklearn digits).

    The first conv pads inputs smaller than 32×32 up to LeNet's 32×32 (padding 2 for 28×28), so 28×28 images
    padded and 32×32 images (e.g. Fashion-MNIST resized as BioTorch does) give the same 16×5×5 feature map and
    the same layers.
    Shape: ``(N, in_channels, image_size, image_size) → (N, num_classes)``.

    An ``nn.Sequential`` of ``features`` and ``classifier`` (a chain: pipeline mode can cut it).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        small = image_size < 16  # e.g. 8x8 digits: 3x3 kernels keep a spatial map
        k = 3 if small else 5
        pad = k // 2 if small else max(0, (32 - image_size) // 2)
        features = nn.Sequential(
            nn.Conv2d(in_channels, 6, k, padding=pad), activation(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, k, padding=k // 2 if small else 0), activation(), nn.MaxPool2d(2),
        )
        side = image_size // 4 if small else ((image_size + 2 * pad - 4) // 2 - 4) // 2
        classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), activation(),
            nn.Linear(120, 84), activation(), nn.Linear(84, num_classes),
        )
        super().__init__(OrderedDict(features=features, classifier=classifier))
