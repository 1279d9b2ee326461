"""Plain-torch models (no falign code inside: convert them with :func:`falign.convert`).

- :class:`MLP`: fully connected network, any widths, ReLU/tanh/sigmoid/linear, with or without bias.
- :class:`LeNet5`: LeNet-5-style CNN (two conv + pool stages, three linear layers).
- :func:`resnet20`, :func:`resnet56`: CIFAR ResNets (He et al. 2016) with BatchNorm and skips.
- :class:`TwoLayerLinear`: ``x ↦ W₂ W₁ x`` with a controllable initialisation scale.
- :func:`build_model`: a model by name, sized for a dataset.
"""

from falign.models.cnn import LeNet5
from falign.models.mlp import MLP, TwoLayerLinear
from falign.models.registry import MODELS, build_model
from falign.models.resnet import CifarResNet, resnet20, resnet56

__all__ = ["MLP", "MODELS", "CifarResNet", "LeNet5", "TwoLayerLinear", "build_model", "resnet20", "resnet56"]
