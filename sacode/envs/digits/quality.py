"""Sample quality and diversity of generated digits.

* Frechet distance (the FID recipe of Heusel et al. 2017 with the digit classifier's 64-dimensional penultimate
  features in place of Inception features):

      FD = ||m_a - m_b||^2 + tr(C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2}),

  the squared 2-Wasserstein distance between the Gaussians fitted to the two feature clouds. It is 0 for equal
  laws and is biased upwards by O(d / n) at finite sample sizes, so numbers are compared at equal n.
* Diversity: the mean pairwise Euclidean distance between samples (in pixel space, [-1, 1]), and the entropy (in
  nats) of the histogram of predicted classes (log 10 = 2.30 for a uniform spread over the ten digits).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from .classifier import DigitClassifier


def gaussian_stats(feat: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feat.detach().double().cpu().numpy()
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to fit a Gaussian to features; got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians fitted to two feature sets of shape (n, d)."""
    (ma, ca), (mb, cb) = gaussian_stats(feat_a), gaussian_stats(feat_b)
    ra = linalg.sqrtm(ca)
    cross = linalg.sqrtm(ra @ cb @ ra)
    cross = np.real(cross)
    return float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(cross))


@torch.no_grad()
def features(classifier: DigitClassifier, x: Tensor, batch: int = 2048) -> Tensor:
    """Classifier features of images (n, 1, 8, 8); images are clipped to [-1, 1] as when they are displayed."""
    return torch.cat([classifier.features(x[j: j + batch].clamp(-1, 1)) for j in range(0, x.shape[0], batch)])


def sample_quality(classifier: DigitClassifier, x: Tensor, reference: Tensor) -> float:
    """FD between generated images ``x`` and ``reference`` images (the held-out digits) in classifier features."""
    return frechet_distance(features(classifier, x), features(classifier, reference))


_REF_FEATURES: dict = {}


def reference_features(classifier: DigitClassifier, which: str = "heldout") -> Tensor:
    """Features of the reference images: ``"heldout"`` (the 360 held-out digits) or ``"class3"`` etc. (every image
    of that digit in the data set, about 180: the held-out split alone has too few of one class for a 64-d FD)."""
    from .data import digits

    key = (id(classifier), which)
    if key not in _REF_FEATURES:
        if which == "heldout":
            ref = digits("heldout")[0]
        elif which.startswith("class") and which[5:].isdigit():
            x, y = digits("all")
            ref = x[y == int(which[5:])]
        else:
            raise ValueError(f"unknown reference {which!r}; use 'heldout' or 'class0' .. 'class9'")
        _REF_FEATURES[key] = features(classifier, ref)
    return _REF_FEATURES[key]


def image_metrics(classifier: DigitClassifier, x: Tensor, target: int | None = None) -> dict:
    """Everything the book reports about a batch of generated digits.

    sample_quality: FD to the held-out digits (all classes); pairwise_distance, class_entropy, class_histogram
    (diversity); with a target class also target_fraction (share classified as the target) and fd_target_class,
    the FD to the images of that class, the natural yardstick of a class reward: with beta = 1 the optimum is
    the pretrained model's class-conditional law, which the FD to all digits rates as poor by construction.
    """
    feat = features(classifier, x)
    hist = class_histogram(classifier, x)
    out = {"sample_quality": frechet_distance(feat, reference_features(classifier, "heldout")),
           "pairwise_distance": mean_pairwise_distance(x), "class_entropy": class_entropy(classifier, x),
           "class_histogram": [round(float(v), 4) for v in hist]}
    if target is not None:
        out["target_fraction"] = float(hist[target])
        out["fd_target_class"] = frechet_distance(feat, reference_features(classifier, f"class{target}"))
    return out


def mean_pairwise_distance(x: Tensor, max_n: int = 1000) -> float:
    """Mean Euclidean distance between distinct samples (the first ``max_n``), in pixel units of [-1, 1]."""
    f = x[:max_n].reshape(min(x.shape[0], max_n), -1).double().clamp(-1, 1)
    n = f.shape[0]
    if n < 2:
        raise ValueError("mean pairwise distance needs at least 2 samples")
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


@torch.no_grad()
def class_histogram(classifier: DigitClassifier, x: Tensor) -> Tensor:
    """Fraction of samples the classifier assigns to each digit, shape (10,)."""
    pred = classifier.logits(x.clamp(-1, 1)).argmax(-1)
    return torch.bincount(pred, minlength=10).double() / pred.numel()


def class_entropy(classifier: DigitClassifier, x: Tensor) -> float:
    """Entropy (nats) of the predicted-class histogram: log 10 for all digits equally often, 0 for one digit."""
    p = class_histogram(classifier, x)
    p = p[p > 0]
    return float(-(p * p.log()).sum())
