"""The PyTorch knowledge-distillation tutorial's data pipeline and loops, kept as the tutorial writes them.

Source: https://pytorch.org/tutorials/beginner/knowledge_distillation_tutorial.html (Alexandros Chariton).
``benchmarks/fast_vs_reference.py`` times these against kd-runner's engine. What is kept exactly:

- the transform (``ToTensor`` + ``Normalize`` with the tutorial's mean/std), applied per image in
  DataLoader workers, batch 128, ``shuffle=True`` for train and ``False`` for test, ``num_workers=2``;
- ``train``: Adam(lr), ``model.train()``, per batch ``inputs.to(device)``, ``zero_grad``, forward,
  ``CrossEntropyLoss``, ``backward``, ``step`` and ``running_loss += loss.item()`` (a host sync per step);
- ``train_knowledge_distillation``: the teacher runs under ``torch.no_grad()`` on every batch, and the loss is
  ``soft_target_loss_weight * KL(softmax(t/T) || log_softmax(s/T)) * T**2 + ce_loss_weight * CE``, the
  KL written out as the tutorial's current text does (older copies used ``-sum(p * log q)``, the same cost);
- ``test``: ``model.eval()``, ``torch.no_grad()``, ``torch.max(outputs.data, 1)``, ``.sum().item()`` per batch.

The only changes: the per-epoch ``print`` became a return value, and the data come from whichever
dataset the caller passes (an ``ImageFolder`` over the JPEG copy of CIFAR-10, or :class:`InMemoryCIFAR`,
which serves images the way ``torchvision.datasets.CIFAR10`` does).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import DataLoader, Dataset

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
BATCH_SIZE = 128
NUM_WORKERS = 2


def tutorial_transform() -> transforms.Compose:
    """The tutorial's ``transforms_cifar``."""
    return transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(mean=MEAN, std=STD),
    ])


def loaders(train_dataset: Dataset, test_dataset: Dataset) -> tuple[DataLoader, DataLoader]:
    """The tutorial's ``train_loader`` and ``test_loader``."""
    train_loader = DataLoader(train_dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS)
    test_loader = DataLoader(test_dataset, batch_size=BATCH_SIZE, shuffle=False, num_workers=NUM_WORKERS)
    return train_loader, test_loader


class InMemoryCIFAR(Dataset):
    """Serves uint8 HWC images like ``torchvision.datasets.CIFAR10.__getitem__``: ``Image.fromarray`` + transform.

    The tutorial reads CIFAR-10's pickles into memory; this gives that per-item cost without the pickles.
    """

    def __init__(self, images_hwc: np.ndarray, targets: list[int], transform: transforms.Compose) -> None:
        self.data, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        img = self.transform(img)
        return img, target


def train(model: nn.Module, train_loader: DataLoader, epochs: int, learning_rate: float,
          device: torch.device) -> float:
    """The tutorial's ``train``; returns the last epoch's mean loss instead of printing it."""
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=learning_rate)

    model.to(device)
    model.train()

    epoch_loss = float("nan")
    for _epoch in range(epochs):
        running_loss = 0.0
        for inputs, labels in train_loader:
            inputs, labels = inputs.to(device), labels.to(device)

            optimizer.zero_grad()
            outputs = model(inputs)

            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

            running_loss += loss.item()

        epoch_loss = running_loss / len(train_loader)
    return epoch_loss


def test(model: nn.Module, test_loader: DataLoader, device: torch.device) -> float:
    """The tutorial's ``test``; returns the accuracy (%) instead of printing it."""
    model.to(device)
    model.eval()

    correct = 0
    total = 0

    with torch.no_grad():
        for inputs, labels in test_loader:
            inputs, labels = inputs.to(device), labels.to(device)

            outputs = model(inputs)
            _, predicted = torch.max(outputs.data, 1)

            total += labels.size(0)
            correct += (predicted == labels).sum().item()

    return 100 * correct / total


def train_knowledge_distillation(teacher: nn.Module, student: nn.Module, train_loader: DataLoader, epochs: int,
                                 learning_rate: float, T: float, soft_target_loss_weight: float,
                                 ce_loss_weight: float, device: torch.device) -> float:
    """The tutorial's ``train_knowledge_distillation``; returns the last epoch's mean loss."""
    ce_loss = nn.CrossEntropyLoss()
    optimizer = optim.Adam(student.parameters(), lr=learning_rate)

    teacher.to(device)
    student.to(device)
    teacher.eval()  # the teacher is frozen
    student.train()

    epoch_loss = float("nan")
    for _epoch in range(epochs):
        running_loss = 0.0
        for inputs, labels in train_loader:
            inputs, labels = inputs.to(device), labels.to(device)

            optimizer.zero_grad()

            # the teacher runs on every batch, without building a graph
            with torch.no_grad():
                teacher_logits = teacher(inputs)

            student_logits = student(inputs)

            # soften both: softmax for the teacher's targets, log_softmax for the student
            soft_targets = nn.functional.softmax(teacher_logits / T, dim=-1)
            soft_prob = nn.functional.log_softmax(student_logits / T, dim=-1)

            # KL(teacher || student) per sample, scaled by T**2 (Hinton et al. 2015)
            soft_targets_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (
                T**2)

            label_loss = ce_loss(student_logits, labels)

            loss = soft_target_loss_weight * soft_targets_loss + ce_loss_weight * label_loss

            loss.backward()
            optimizer.step()

            running_loss += loss.item()

        epoch_loss = running_loss / len(train_loader)
    return epoch_loss
