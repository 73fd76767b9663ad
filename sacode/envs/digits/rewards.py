"""Rewards for generated digits, in the protocol shared with Stable Diffusion (chapter 12):

    reward(x, cond) -> Tensor of shape (n,)     for images x of shape (n, 1, 8, 8) in [-1, 1] and per-sample conditions.

Every reward first clips the images to [-1, 1], the image a reader sees; a sample outside that range gains nothing.
``differentiable`` says whether the reward has a useful gradient in x (needed by ``backprop`` and
``ctpo-pathwise``, and by nothing else: ``ctpo``, ``ddpo`` and ``dpok`` use reward values only).

=========================  ===================================================================  =================
reward                     r(x)                                                                 differentiable
=========================  ===================================================================  =================
:class:`ClassLogProb`      log p(y = c | x) of the digit classifier; the target c is fixed or     yes
                           the condition (``cond`` = a tensor of class labels)
:class:`TotalInk`          number of inked pixels, sum_ij (x_ij + 1)/2, in [0, 64]                yes
:class:`JPEGCompressibility` minus the size in kB of the image upsampled 4x (32x32, nearest) and    no
                           saved by PIL as a JPEG of quality 75 (DDPO's compressibility reward)
=========================  ===================================================================  =================
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from ...theory.conditions import Conditions

from .classifier import DigitClassifier


def _check_images(x: Tensor) -> Tensor:
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"digit rewards take images of shape (n, 1, 8, 8) in [-1, 1]; got {tuple(x.shape)}")
    return x.clamp(-1.0, 1.0)


class ClassLogProb:
    """r(x, c) = log p(y = c | x) under the digit classifier.

    With KL weight beta = 1 the optimally fine-tuned law p_pre(x) e^{r(x)/beta} / Z is p_pre(x) p(c | x) / p(c),
    i.e. the class-conditional law of the pretrained model; J* = log E_pre[p(c | X)] (chapter 11).
    """

    differentiable = True

    def __init__(self, classifier: DigitClassifier, target: int | None = 3):
        if target is not None and not 0 <= int(target) <= 9:
            raise ValueError(f"target digit must be in 0..9; got {target}")
        self.classifier, self.target = classifier, None if target is None else int(target)

    def labels(self, n: int, cond: Conditions | None) -> Tensor:
        if self.target is not None:
            return torch.full((n,), self.target, dtype=torch.long)
        values = cond.values if isinstance(cond, Conditions) else cond
        if not isinstance(values, Tensor) or values.shape != (n,):
            raise ValueError("this class reward has no fixed target: pass conditions holding a LongTensor of n class "
                             "labels")
        return values.long()

    def __call__(self, x: Tensor, cond: Conditions | None = None) -> Tensor:
        lp = self.classifier.log_probs(_check_images(x))
        return lp.gather(1, self.labels(x.shape[0], cond)[:, None]).squeeze(1).to(x.dtype)


class TotalInk:
    """r(x) = sum over the 64 pixels of the ink fraction (x + 1)/2: 0 for a blank page, 64 for a black one."""

    differentiable = True

    def __call__(self, x: Tensor, cond: Conditions | None = None) -> Tensor:
        return ((_check_images(x) + 1.0) / 2.0).sum(dim=(1, 2, 3))


class JPEGCompressibility:
    """r(x) = -(JPEG file size in kB) of the image upsampled ``upsample`` times (nearest neighbour), via PIL.

    Piecewise constant in x (quantisation, entropy coding): no gradient, so only likelihood-ratio methods apply.
    Ink is dark: the grey level is 255 (x + 1)/2 inverted to black ink on white paper, as the digits are shown.
    """

    differentiable = False

    def __init__(self, upsample: int = 4, quality: int = 75):
        self.upsample, self.quality = int(upsample), int(quality)

    def sizes_kb(self, x: Tensor) -> Tensor:
        from PIL import Image

        img = ((1.0 - (_check_images(x) + 1.0) / 2.0) * 255.0).round().to(torch.uint8)[:, 0].cpu().numpy()
        out = np.empty(img.shape[0])
        for i, a in enumerate(img):
            buf = io.BytesIO()
            big = np.kron(a, np.ones((self.upsample, self.upsample), dtype=np.uint8))
            Image.fromarray(big, mode="L").save(buf, format="JPEG", quality=self.quality)
            out[i] = buf.tell() / 1000.0
        return torch.from_numpy(out)

    @torch.no_grad()
    def __call__(self, x: Tensor, cond: Conditions | None = None) -> Tensor:
        return -self.sizes_kb(x).to(x.dtype)
