"""The PyTorch KD tutorial's DeepNN teacher and LightNN student, sized to any input."""

from __future__ import annotations

import torch
from torch import nn


def flat_features(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Width of ``features``' flattened output for one input of ``input_shape``."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class FeaturesClassifier(nn.Module):
    """``classifier(flatten(features(x)))``: the shape of every conv model here; tap ``features`` by name."""

    features: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DeepNN(FeaturesClassifier):
    """Tutorial teacher: 4 convs + 2 pools, then 512-wide MLP. 1,186,986 params on CIFAR-10."""

    # layer sets for feature methods: each pool's output, and each block's last conv before its ReLU
    kd_layer_sets = {"last_stage": ["features"], "stages": ["features.4", "features.9"],
                     "preact_stages": ["features.2", "features.7"]}

    def __init__(self, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, input_shape), 512),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(512, num_classes),
        )


class LightNN(FeaturesClassifier):
    """Tutorial student: 2 convs + 2 pools, then 256-wide MLP. 267,738 params on CIFAR-10."""

    kd_layer_sets = {"last_stage": ["features"], "stages": ["features.2", "features.5"],
                     "preact_stages": ["features.0", "features.3"]}

    def __init__(self, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(self.features, input_shape), 256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(256, num_classes),
        )
