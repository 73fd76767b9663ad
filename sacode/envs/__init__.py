"""Environments of the engine: the toy presets, 8x8 digits and Stable Diffusion. Each package registers its presets
in :mod:`sacode.registry` when imported; the engine imports none of them."""
