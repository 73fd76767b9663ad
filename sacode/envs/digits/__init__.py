"""Images on a laptop (chapter 11): a small pretrained UNet score model on scikit-learn's 8x8 digits, a digit
classifier, image rewards, sample-quality metrics and the fine-tuning task for the engine.

Modules: :mod:`.data` (the digits in [-1, 1], a fixed train / held-out split), :mod:`.unet` (the score model),
:mod:`.classifier` (the reward and feature network), :mod:`.rewards`, :mod:`.quality` (Frechet distance,
diversity), :mod:`.pretrain` (``python -m sacode pretrain digits|digits-classifier``), :mod:`.task` (the
environment, the policy and the presets ``digits-*`` of ``python -m sacode train``).
"""
from ... import registry
from .task import DIGITS_PRESETS, DigitsTask

for _p in DIGITS_PRESETS.values():
    registry.register(registry.Preset(_p.name, "digits", DigitsTask,
                                      f"8x8 digits UNet, reward {_p.reward}" + (f" (digit {_p.target})" if _p.target
                                                                                 is not None else "")
                                      + f", beta = {_p.beta:g}"))
