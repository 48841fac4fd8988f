"""Small conv nets from the mission's demos: the Keras MNIST teacher and the ResNet-50 demo's student."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_runner.models.tutorial import FeaturesClassifier, flat_features


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's padding='same' along one axis: (before, after); the odd pixel goes after (bottom/right)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFSamePad2d(nn.Module):
    """Pad (N, C, H, W) as TensorFlow's padding='same' does for a following ``kernel``/``stride`` op.

    PyTorch's symmetric ``padding=1`` differs for stride 2 on even sizes: TF pads bottom/right only
    (28 -> 14: zero rows/cols 0 before, 1 after). ``mode='replicate'`` suits a following max-pool
    (TF ignores the padded cells; repeating the edge value gives the same maximum).
    """

    def __init__(self, kernel_size: int, stride: int, mode: str = "constant") -> None:
        super().__init__()
        self.kernel_size, self.stride, self.mode = kernel_size, stride, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = tf_same_padding(x.shape[-1], self.kernel_size, self.stride)
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom), mode=self.mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, mode={self.mode}"


class KerasConvTeacher(FeaturesClassifier):
    """Keras demo teacher: Conv(256, s2) -> LeakyReLU(0.2) -> MaxPool(2, s1) -> Conv(512, s2) -> Dense.

    Every padding is TensorFlow's 'same' (bottom/right); 1,433,610 parameters on MNIST, as the demo's summary.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            TFSamePad2d(3, 2),
            nn.Conv2d(input_shape[0], 256, kernel_size=3, stride=2),
            nn.LeakyReLU(negative_slope),
            TFSamePad2d(2, 1, mode="replicate"),
            nn.MaxPool2d(kernel_size=2, stride=1),
            TFSamePad2d(3, 2),
            nn.Conv2d(256, 512, kernel_size=3, stride=2),
        )
        self.classifier = nn.Linear(flat_features(self.features, input_shape), num_classes)


class DemoCNN(nn.Module):
    """The ResNet-50 CIFAR-10 demo's student ``Net``, layer for layer.

    [conv3x3 64, ReLU, conv3x3 64, ReLU, maxpool 2] -> [conv3x3 128, ReLU, conv3x3 128, ReLU, maxpool 2]
    -> global average pool -> Linear(128, 32) -> Linear(32, classes), with nothing between the two
    Linear layers (the demo's ``dropout_rate = 0.5`` is never applied, so it is not here either).
    Tap ``features`` (the conv stack's 128-channel map) or ``embedding`` (the 32-wide fc1 output).
    264,618 parameters for 3-channel inputs and 10 classes, at any input size.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Linear(128, 32)
        self.classifier = nn.Linear(32, num_classes)
        flat_features(self.features, input_shape)  # an input too small for the two pools fails here, at build time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(torch.flatten(self.pool(self.features(x)), 1)))


class SmallCNN(FeaturesClassifier):
    """A compact student for the ResNet-50 demo: two conv blocks and a 128-wide head."""

    kd_layer_sets = {"last_stage": ["features"], "stages": ["features.3", "features.7"],
                     "preact_stages": ["features.1", "features.5"]}

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, input_shape), 128),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )
