"""Prompt sets: the conditions c of the text-to-image environment.

* ``unicorn`` — the single prompt of the paper's ImageReward run (chapter 12).
* ``animals`` — common animal names, the kind of prompt set DDPO used for its compressibility and aesthetic runs
  (this list is ours, not DDPO's file).
* any other string — a single literal prompt; ``file:PATH`` — one prompt per line of a text file.
"""
from __future__ import annotations

from pathlib import Path

import torch

UNICORN = "A unicorn in a clearing. it has a single shining horn. volumetric light."

ANIMALS = [
    "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "rabbit", "fox", "wolf", "bear", "deer", "lion", "tiger",
    "leopard", "cheetah", "elephant", "giraffe", "zebra", "hippopotamus", "rhinoceros", "camel", "kangaroo", "koala",
    "panda", "monkey", "gorilla", "squirrel", "hedgehog", "owl", "eagle", "parrot", "penguin", "flamingo", "swan",
    "duck", "chicken", "turtle", "frog", "crocodile", "snake", "dolphin", "whale", "octopus", "butterfly",
]

PROMPT_SETS = {"unicorn": [UNICORN], "animals": ANIMALS}


class PromptSampler:
    """Draws n prompts uniformly (with replacement) from a list, with a torch generator (reproducible, resumable)."""

    def __init__(self, prompts: list[str]):
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("a prompt set must be a non-empty list of strings")
        self.prompts = list(prompts)

    @classmethod
    def named(cls, spec: str) -> "PromptSampler":
        """``unicorn``, ``animals``, ``file:PATH`` (one prompt per line) or a literal prompt."""
        if spec in PROMPT_SETS:
            return cls(PROMPT_SETS[spec])
        if spec.startswith("file:"):
            path = Path(spec[5:]).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"prompt file {path} not found (prompts=file:PATH expects one prompt per line)")
            return cls([ln.strip() for ln in path.read_text().splitlines() if ln.strip()])
        return cls([spec])

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        if len(self.prompts) == 1:
            return self.prompts * n
        idx = torch.randint(len(self.prompts), (n,), generator=generator, device=generator.device).cpu()
        return [self.prompts[int(i)] for i in idx]
