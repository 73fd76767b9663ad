"""A small convolutional digit classifier on the 8x8 digits: the reward model and the feature map of the
sample-quality metric.

``logits(x)`` gives the 10 class scores and ``features(x)`` the 64-dimensional penultimate activations, in which
the Frechet distance of :mod:`sacode.envs.digits.quality` is computed (the digits analogue of the Inception features of
FID). Trained on the training split only, with random one-pixel translations and small Gaussian pixel noise as
augmentation; ``python -m sacode pretrain digits-classifier`` rebuilds the committed checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """conv(1->32) - conv(32->64, stride 2) - conv(64->64) - linear(1024->64) [features] - linear(64->10)."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim)
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, 10)

    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digit classifier takes images of shape (n, 1, 8, 8) in [-1, 1]; got {tuple(x.shape)}")
        return x.float()

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, shape (n, 64)."""
        return self.fc(self.conv(self._check(x)))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)

    def log_probs(self, x: Tensor) -> Tensor:
        """log p(y | x) for the 10 classes, shape (n, 10)."""
        return F.log_softmax(self.logits(x), dim=-1)


def augment(x: Tensor, gen: torch.Generator, noise: float = 0.1) -> Tensor:
    """Random translation by -1, 0 or +1 pixel in each direction (padding with blank paper, -1) plus N(0, noise^2)."""
    n = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None])                    # (n, 8)
    cols = (dx[:, None] + torch.arange(8)[None])
    out = torch.stack([pad[i, :, rows[i]][:, :, cols[i]] for i in range(n)])
    return out + noise * torch.randn(x.shape, generator=gen)


def train_classifier(x: Tensor, y: Tensor, epochs: int = 40, batch: int = 64, lr: float = 2e-3,
                     weight_decay: float = 1e-4, seed: int = 0) -> tuple[DigitClassifier, list[dict]]:
    """Cross-entropy training with Adam and cosine decay; returns the model (eval mode) and a per-epoch log."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((x.shape[0] + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    log = []
    for ep in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        tot, cnt = 0.0, 0
        model.train()
        for j in range(0, x.shape[0], batch):
            idx = perm[j: j + batch]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, cnt = tot + float(loss.detach()) * idx.numel(), cnt + idx.numel()
        log.append({"epoch": ep + 1, "loss": tot / cnt})
    model.eval()
    return model, log


@torch.no_grad()
def accuracy(model: DigitClassifier, x: Tensor, y: Tensor) -> float:
    return float((model.logits(x).argmax(-1) == y).double().mean())
