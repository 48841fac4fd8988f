"""Small conv nets from the mission's demos: the Keras MNIST teacher and the ResNet-50 demo's student."""

from __future__ import annotations

from torch import nn

from kd_runner.models.tutorial import FeaturesClassifier, flat_features


class KerasConvTeacher(FeaturesClassifier):
    """Keras demo teacher: Conv(256, s2) -> LeakyReLU(0.2) -> MaxPool(2, s1, same) -> Conv(512, s2) -> Dense."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 256, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(negative_slope),
            nn.ReplicationPad2d((0, 1, 0, 1)),  # Keras 'same' pooling with stride 1
            nn.MaxPool2d(kernel_size=2, stride=1),
            nn.Conv2d(256, 512, kernel_size=3, stride=2, padding=1),
        )
        self.classifier = nn.Linear(flat_features(self.features, input_shape), num_classes)


class SmallCNN(FeaturesClassifier):
    """A compact student for the ResNet-50 demo: two conv blocks and a 128-wide head."""

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
