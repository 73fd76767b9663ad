"""Shared pytest configuration for the sacode unit tests.

* ``@pytest.mark.slow`` tests are skipped unless ``--run-slow`` is given.
* ``@pytest.mark.gpu`` tests run only with ``--run-gpu`` *and* when ``torch.cuda.is_available()``.
* ``@pytest.mark.browser`` tests (a real Chromium, see tests/browser_support.py) run only with
  ``--run-browser``; ``make check-book`` runs them. (The markers are declared in pyproject.toml.)
* Everything is float64 and seeded: use the ``gen`` fixture (a seeded ``torch.Generator``) or
  :func:`make_gen`, and :func:`f64` to build float64 tensors (the default dtype is left alone, so library
  code is exercised under the float32 default that users have).
* ``Z`` is the number of Monte-Carlo standard errors a statistical assertion allows (the same constant
  as ``python -m sacode verify``).
"""
from __future__ import annotations

import math

import pytest
import torch

from sacode.verify import Z  # noqa: F401  (re-exported for the test modules)

DTYPE = torch.float64


def f64(x) -> torch.Tensor:
    """A float64 tensor from a number, list or tensor."""
    return torch.as_tensor(x, dtype=DTYPE)


def make_gen(seed: int = 0) -> torch.Generator:
    """A CPU torch generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


def mean_se(x: torch.Tensor) -> torch.Tensor:
    """Standard error of the sample mean along axis 0."""
    return x.std(0) / math.sqrt(x.shape[0])


def pytest_configure(config):
    # The unit tests are many small tensor ops, where intra-op threads cost more than they gain: on a loaded
    # 2-core machine a 40k-element torch.exp took 15 ms with 2 threads and 0.2 ms with 1. One thread keeps the
    # suite fast and its timings stable.
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", default=False,
                     help="run tests marked gpu (needs CUDA as well)")
    parser.addoption("--run-browser", action="store_true", default=False,
                     help="run tests marked browser (needs chromium and chromium-driver)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow")
    run_gpu = config.getoption("--run-gpu")
    run_browser = config.getoption("--run-browser")
    skip_browser = pytest.mark.skip(reason="browser test: pass --run-browser (or run `make check-book`)")
    cuda = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow test: pass --run-slow to run it")
    if not run_gpu:
        skip_gpu = pytest.mark.skip(reason="gpu test: pass --run-gpu (and have CUDA) to run it")
    elif not cuda:
        skip_gpu = pytest.mark.skip(reason="gpu test: --run-gpu given but torch.cuda.is_available() is False")
    else:
        skip_gpu = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and skip_gpu is not None:
            item.add_marker(skip_gpu)
        if "browser" in item.keywords and not run_browser:
            item.add_marker(skip_browser)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator (seed 0) for each test."""
    return make_gen(0)


@pytest.fixture
def gens():
    """A factory of seeded generators: ``gens(seed)``."""
    return make_gen


@pytest.fixture
def float64_default():
    """Opt-in: float64 as torch's default dtype inside one test (restored afterwards).

    Not autouse on purpose: library code must work under the float32 default users have, so the tests build
    their float64 tensors explicitly (``f64``) instead of relying on the default.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
