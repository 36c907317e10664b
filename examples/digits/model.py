"""The digits model. This file is copied next to the weights (model directory contract), so it
imports nothing but torch."""
import torch
from torch import nn


def build_model(in_features: int = 64, hidden: int = 128, classes: int = 10, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, classes),
    )


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """Raw 8x8 digits pixels (0..16) -> the model's input scale."""
    return x.float() / 16.0
