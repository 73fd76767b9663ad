"""Dynamics (chapters 1-2): forward SDEs in diffusion time, the conversion to RL time, time grids, the one Gaussian
sampler step and the samplers built on it. Nothing here knows about rewards or fine-tuning."""
