"""Training options of chapters 8 and 10: unbiased advantage centring, the clamp of standardised advantages, the
fraction of clipped gradient steps, grids with a random number of steps, and the per-step control policy."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import Z, make_gen
from sacode.dynamics.grid import TimeGrid
from sacode.engine.algos import clamp_standardised, normalise
from sacode.engine.policy import PerStepPolicy
from sacode.engine.trainer import training_grid
from sacode.envs.toys import ToyEnv
from sacode.runs import make_config, make_trainer
from sacode.theory.discrete_optimum import discrete_optimum
from sacode.theory.presets import toy_preset

TINY = {"iterations": 2, "batch": 16, "eval_batch": 32, "K": 6, "hidden": 8, "progress": False}


def _centred_gradient(mode: str, n: int, batches: int = 40000) -> tuple[float, float]:
    """Likelihood-ratio estimate of d/dm E[a] = 1 for a ~ N(m, 1) with advantage a, centred by ``mode``; batches of
    n, each batch gives one estimate; returns (mean, standard error) over batches."""
    a = torch.randn(batches, n, generator=make_gen(3), dtype=torch.float64)     # m = 0
    adv = normalise(a, mode)                     # normalise centres along axis 1 (the batch); rows act as steps
    g = (a * adv).mean(1)                                              # score (a - m) times the advantage
    return float(g.mean()), float(g.std()) / batches**0.5


@pytest.mark.parametrize("n", [2, 4, 8])
def test_center_is_an_unbiased_baseline(n):
    """Leave-one-out centring keeps E[score x advantage] = 1; the plain batch mean would give 1 - 1/n (the check
    fails for the biased baseline: breaking the n/(n-1) factor moves the estimate by 1/n >> Z SE)."""
    mean, se = _centred_gradient("center", n)
    assert abs(mean - 1.0) <= Z * se, (mean, se)
    a = torch.randn(40000, n, generator=make_gen(3), dtype=torch.float64)
    biased = (a * (a - a.mean(1, keepdim=True))).mean(1)
    assert abs(float(biased.mean()) - (1 - 1 / n)) <= Z * float(biased.std()) / 200
    assert abs(float(biased.mean()) - 1.0) > Z * se                    # the plain batch mean is detectably biased


def test_standardised_advantages_are_clamped_and_centred_ones_are_not():
    adv = torch.tensor([[-50.0, 0.0, 50.0]], dtype=torch.float64)
    assert torch.equal(clamp_standardised(adv, "step", 5.0), torch.tensor([[-5.0, 0.0, 5.0]], dtype=torch.float64))
    assert torch.equal(clamp_standardised(adv, "center", 5.0), adv)


@pytest.mark.parametrize("algo", ["ctpo", "ctpo-pathwise", "ddpo", "dpok", "backprop"])
def test_every_algorithm_logs_the_clipped_fraction(tmp_path, algo):
    cfg = make_config("gauss1d-linear", algo, "ci", 0, TINY | {"max_grad_norm": 1e-9})
    make_trainer(cfg, tmp_path).run()
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_clipped_frac"] == 1.0 for r in recs)           # every step exceeds a tiny threshold
    cfg = make_config("gauss1d-linear", algo, "ci", 0, TINY | {"max_grad_norm": 1e9})
    make_trainer(cfg, tmp_path / "b").run()
    recs = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_clipped_frac"] == 0.0 for r in recs)


def test_random_grids_draw_their_number_of_steps():
    cfg = make_config("gauss1d-linear", "ctpo", "ci", 0, {"grid": "random", "K": 3, "random_K_max": 6})
    env = ToyEnv(toy_preset("gauss1d-linear"))
    gen = make_gen(0)
    Ks = [training_grid(cfg, env, gen).K for _ in range(200)]
    assert set(Ks) == {3, 4, 5, 6}
    with pytest.raises(ValueError, match="random_K_max"):
        make_config("gauss1d-linear", "ctpo", "ci", 0, {"K": 10, "random_K_max": 50})     # needs grid=random


def test_per_step_policy_looks_up_the_step_that_contains_t():
    pr = toy_preset("gauss1d-linear")
    env = ToyEnv(pr)
    grid = TimeGrid.uniform(pr.sde.T, 4)
    pol = PerStepPolicy(env, grid.s, hidden=8)
    # grid times map to their own step; times inside a step map to it; the data end to the last step
    s = torch.tensor([1.0, 0.75, 0.74, 0.5, 0.26, 0.25, 0.1, 0.0], dtype=torch.float64)
    assert pol.step_index(s).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    x = torch.linspace(-2, 2, 8, dtype=torch.float64)
    assert torch.equal(pol(s, x), env.pretrained_score(s, x))          # zero corrections: the pretrained score
    with torch.no_grad():
        for k, net in enumerate(pol.nets):
            net[-1].bias.fill_(float(k + 1))
    assert pol.correction(s, x).tolist() == [1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 4.0]


def test_per_step_policy_represents_the_k_step_optimum_by_step():
    """A per-step policy whose step-k network outputs the optimum's affine correction reproduces the exact K-step
    optimum's score on its grid and the 'previous' extension off it."""
    pr = toy_preset("gauss1d-linear")
    env = ToyEnv(pr)
    grid = TimeGrid.uniform(pr.sde.T, 5)
    d = discrete_optimum(pr, grid)
    th0, th1 = d.control()
    assert all(abs(v) < 1e-12 for v in th1)                            # linear reward: a correction in t only
    pol = PerStepPolicy(env, grid.s, hidden=4)
    with torch.no_grad():
        for k, net in enumerate(pol.nets):
            net[-1].bias.fill_(float(th0[k]))
    fine = TimeGrid.uniform(pr.sde.T, 40)
    x = torch.randn(40, generator=make_gen(1), dtype=torch.float64)
    ref = d.score_fn(pr, "previous")
    for k in range(40):
        assert torch.allclose(pol(fine.s[k], x), ref(fine.s[k], x), rtol=0, atol=1e-12)


def test_toy_task_builds_the_policy_the_config_asks_for(tmp_path):
    tr = make_trainer(make_config("gauss1d-linear", "ddpo", "ci", 0, TINY | {"policy": "per-step"}), tmp_path)
    assert isinstance(tr.policy, PerStepPolicy) and tr.policy.K == 6
    tr.run()
    with pytest.raises(ValueError, match="policy"):
        make_config("gauss1d-linear", "ddpo", "ci", 0, {"policy": "table"})
