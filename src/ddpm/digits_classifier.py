"""The digits classifier: a small CNN for scikit-learn's 8x8 digits, and the loader of its shipped weights.

Its penultimate activations (128-d) are the `digits` feature extractor behind digits-FID and -KID in
ddpm.metrics; its predictions give the classifier scores (confidence, coverage). The weights ship in
ddpm/assets/ (digits_classifier.safetensors, < 1 MB) with their held-out accuracy and training settings in
digits_classifier.json; scripts/train_digits_classifier.py reproduces them from the train split only.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASSETS = Path(__file__).parent / "assets"
WEIGHTS_PATH = ASSETS / "digits_classifier.safetensors"
INFO_PATH = ASSETS / "digits_classifier.json"
SIZE = 8  # the classifier's input resolution
NUM_CLASSES = 10


def to_digits_input(x: Tensor) -> Tensor:
    """Bring images in [-1, 1] to the classifier's input: (B, 1, 8, 8) float32, clamped to [-1, 1].

    3-channel images are averaged over channels; other resolutions (e.g. digits upsampled by the data's
    `resolution` key) are resized to 8x8 with area interpolation, which undoes nearest upsampling exactly.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"digits classifier expects (B, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
    return x.clamp(-1.0, 1.0)


class DigitsClassifier(nn.Module):
    """conv3x3(32) -> conv3x3(64) -> maxpool 2 -> fc(128) -> fc(10), ReLU between; ~150k parameters.

    `features(x)` returns the 128-d penultimate activations (post-ReLU), `forward(x)` the 10 logits.
    Any (B, 1|3, H, W) input in [-1, 1] is accepted (see `to_digits_input`).
    """

    def __init__(self, width: int = 32, num_features: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.num_features = num_features
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (SIZE // 2) ** 2, num_features)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(num_features, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        x = to_digits_input(x)  # (B, 1, 8, 8)
        x = F.relu(self.conv1(x))  # (B, w, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, 4, 4)
        return F.relu(self.fc1(x.flatten(1)))  # (B, num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.features(x)))  # (B, 10)


class DigitsFeatures(nn.Module):
    """The classifier's penultimate features as a torchmetrics feature extractor (has `num_features`)."""

    def __init__(self, classifier: DigitsClassifier, name: str = "digits") -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features
        self.name = name  # names the cache entries it produces; include the weights' digest

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


def classifier_info() -> dict[str, Any]:
    """The recorded training settings and held-out accuracy of the shipped weights (digits_classifier.json)."""
    return json.loads(INFO_PATH.read_text())


@lru_cache(maxsize=None)
def weights_digest(path: Path = WEIGHTS_PATH) -> str:
    """First 8 hex digits of a weights file's sha256 (so retraining invalidates cached reference features)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]


def load_digits_classifier(path: str | Path | None = None, device: torch.device | str = "cpu") -> DigitsClassifier:
    """The classifier with the shipped (or given) weights, in eval mode, parameters frozen."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; recreate them with "
            "`python scripts/train_digits_classifier.py`"
        )
    state = load_file(str(path))
    model = DigitsClassifier(width=state["conv1.weight"].shape[0], num_features=state["fc1.weight"].shape[0])
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.eval().to(device)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of `images` whose argmax logit equals `labels`."""
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)
