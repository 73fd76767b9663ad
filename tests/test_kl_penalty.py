"""The two per-step KL penalties (chapter 4, "the two KLs side by side"): the exact chain KL and the paper code's
Girsanov form, their weights on the Stable Diffusion schedule, and the ``kl=chain|girsanov`` training option."""
from __future__ import annotations

import math

import pytest
import torch

from sacode.dynamics.gaussian_step import gaussian_step
from sacode.dynamics.grid import TimeGrid
from sacode.engine.algos import Transitions
from sacode.runs import make_config, make_trainer
from sacode.theory.control import rollout
from sacode.theory.kl import (chain_kl_weights, eta_factor, girsanov_kl_weights, kl_penalty_scale, kl_weight_ratio,
                              published_beta_for_chain)

TINY = {"iterations": 2, "batch": 32, "eval_batch": 64, "K": 8, "hidden": 16, "progress": False,
        "checkpoint_every": 1}


@pytest.fixture(scope="module")
def sd15():
    diffusers = pytest.importorskip("diffusers")
    from sacode.envs.sd.schedule import ScheduleSDE, scheduler_grid
    sch = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sde = ScheduleSDE.from_scheduler(sch)
    return sde, lambda K: scheduler_grid(sch, K, sde)


def test_ddim1_weights_in_closed_form(sd15):
    """VP DDIM(1): chain weight (abar_n/abar_c - 1)(1 - abar_c)/(1 - abar_n), Girsanov weight log(abar_n/abar_c)."""
    sde, grid_of = sd15
    grid = grid_of(50)
    ac, an = sde.alpha_bar(grid.s[:-1]), sde.alpha_bar(grid.s[1:])
    assert torch.allclose(chain_kl_weights(sde, grid, "ddim", 1.0), (an / ac - 1) * (1 - ac) / (1 - an), rtol=1e-10)
    assert torch.allclose(girsanov_kl_weights(sde, grid, 1.0), torch.log(an / ac), rtol=1e-12)


@pytest.mark.parametrize("K", [10, 50, 500])
def test_sd15_terminal_steps(sd15, K):
    """The last step (timestep 1 -> 0) has the same ratio 2.0055 at every K (eta = 1); the bulk tends to 1."""
    sde, grid_of = sd15
    r = kl_weight_ratio(sde, grid_of(K), "ddim", 1.0)
    assert abs(float(r[-1]) - 2.0055) < 5e-4
    assert float(r[:-2].min()) > 1.0                     # the chain KL always exceeds the Girsanov penalty
    if K == 50:
        assert abs(float(r[-2]) - 11.6) < 0.05           # the step into timestep 1
        assert 1.08 < float(r[1:-2].median()) < 1.15
    if K == 500:
        assert abs(float(r[1:-2].median()) - 1.0) < 0.02


def test_published_beta_conversion(sd15):
    """beta_chain sum c_k u_k = beta_girsanov sum w_k u_k: the converted beta gives the same whole-path penalty."""
    sde, grid_of = sd15
    grid = grid_of(50)
    u = torch.linspace(0.5, 2.0, grid.K, dtype=torch.float64)
    b = published_beta_for_chain(0.01, sde, grid, "ddim", 1.0, u)
    c, w = chain_kl_weights(sde, grid, "ddim", 1.0), girsanov_kl_weights(sde, grid, 1.0)
    assert math.isclose(b * float((c * u).sum()), 0.01 * float((w * u).sum()), rel_tol=1e-12)
    assert b < 0.01                                       # the chain KL is larger, so its beta is smaller


def test_em_ratio_is_the_riemann_weight():
    """EM(eta): the chain weight is the factor times g(s_k)^2 dt, exactly; the ratio to the Girsanov weight is
    g(s_k)^2 dt / int_step g^2 for every eta."""
    from sacode.dynamics.sde import VPSDE
    sde = VPSDE(0.1, 20.0)
    grid = TimeGrid.uniform(1.0, 40, s_end=1e-3)
    for eta in (1.0, 0.5, 0.2):
        assert torch.allclose(chain_kl_weights(sde, grid, "em", eta),
                              eta_factor(eta) * sde.g2(grid.s[:-1]) * grid.dt, rtol=1e-12)
        assert torch.allclose(kl_weight_ratio(sde, grid, "em", eta),
                              sde.g2(grid.s[:-1]) * grid.dt / sde.int_g2(grid.s[1:], grid.s[:-1]), rtol=1e-12)


def test_penalty_scale_rejects_deterministic_steps():
    from sacode.dynamics.sde import VPSDE
    with pytest.raises(ValueError, match="eta > 0"):
        kl_penalty_scale("girsanov", VPSDE(), "ddim", 0.0, 0.5, 0.4, torch.ones(2))
    with pytest.raises(ValueError, match="unknown KL form"):
        kl_penalty_scale("path", VPSDE(), "em", 1.0, 0.5, 0.4, torch.ones(2))
    with pytest.raises(ValueError, match="kl=girsanov needs a stochastic sampler"):
        make_config("gauss1d-linear", "ctpo", "ci", 0, TINY | {"kl": "girsanov", "method": "pf-euler",
                                                              "explore": 0.3})


def _perturbed_trainer(tmp_path, kl, method="ddim", eta=0.5, K=8, algo="ctpo"):
    cfg = make_config("gauss1d-quadratic", algo, "ci", 0, TINY | {"kl": kl, "method": method, "eta": eta, "K": K})
    tr = make_trainer(cfg, tmp_path / kl)
    torch.manual_seed(0)
    torch.nn.init.normal_(tr.policy.net.net[-1].weight, std=0.1)   # a policy that differs from s_pre
    return tr


@pytest.mark.parametrize("method,eta", [("ddim", 0.5), ("ddim", 1.0), ("em", 0.7)])
def test_girsanov_penalty_at_recorded_states(tmp_path, method, eta):
    """kl=girsanov: the per-step penalty is 1/2 eta_factor int g^2 ||s_theta - s_pre||^2 at the recorded states, in
    the value targets (penalty_steps) and in the loss term (step_penalty)."""
    tr = _perturbed_trainer(tmp_path, "girsanov", method, eta)
    grid = TimeGrid.uniform(1.0, 8, 1e-3)
    b = rollout(tr.env, tr.policy, grid, tr.transition, 16, torch.Generator().manual_seed(0))
    pol, pre = tr.policy.score_fn(None), tr.env.pretrained_score
    want = []
    for k in range(grid.K):
        s = torch.full((16,), float(grid.s[k]), dtype=b.xs.dtype)
        ds = pol(s, b.xs[k]) - pre(s, b.xs[k], b.cond)
        want.append(0.5 * eta_factor(eta) * tr.env.sde.int_g2(grid.s[k + 1], grid.s[k]) * ds.reshape(16, -1).pow(2)
                    .sum(1))
    want = torch.stack(want).detach()
    got = tr.algo.penalty_steps(b)
    assert torch.allclose(got, want.to(got), rtol=1e-8, atol=1e-12)
    t = Transitions.from_rollout(b)
    _, mean = tr.algo._logp(t, torch.arange(t.i.numel()), b.cond)
    step = tr.algo.step_penalty(mean, t.pre_mean, t.std, t.s_cur, t.s_next).detach()
    assert torch.allclose(step, want.reshape(-1).to(step), rtol=1e-8, atol=1e-12)
    # the chain option leaves the recorded chain KL as it is
    tc = _perturbed_trainer(tmp_path, "chain", method, eta)
    assert torch.equal(tc.algo.penalty_steps(b), b.kl_steps)


def test_both_penalties_agree_on_a_fine_grid(tmp_path):
    """EM(1) on K = 400 uniform steps: chain and Girsanov penalties (and their gradients in the policy parameters)
    differ by O(1/K)."""
    out = {}
    for kl in ("chain", "girsanov"):
        tr = _perturbed_trainer(tmp_path, kl, "em", 1.0, K=400)
        grid = TimeGrid.uniform(1.0, 400)
        b = rollout(tr.env, tr.policy, grid, tr.transition, 64, torch.Generator().manual_seed(1))
        t = Transitions.from_rollout(b)
        _, mean = tr.algo._logp(t, torch.arange(t.i.numel()), b.cond)
        loss = tr.algo.step_penalty(mean, t.pre_mean, t.std, t.s_cur, t.s_next).sum() / 64
        g = torch.autograd.grad(loss, [p for p in tr.policy.parameters() if p.requires_grad])
        out[kl] = (float(loss.detach()), torch.cat([x.reshape(-1) for x in g]))
    (lc, gc), (lg, gg) = out["chain"], out["girsanov"]
    assert abs(lc - lg) < 0.02 * lc
    assert float((gc - gg).norm()) < 0.02 * float(gc.norm())


def test_ddpo_scales_the_sampled_log_ratio(tmp_path):
    """ddpo with kl=girsanov: each step's sampled log-ratio is multiplied by the state-independent factor."""
    tr = _perturbed_trainer(tmp_path, "girsanov", "ddim", 0.5, algo="ddpo")
    grid = TimeGrid.uniform(1.0, 8, 1e-3)
    b = rollout(tr.env, tr.policy, grid, tr.transition, 16, torch.Generator().manual_seed(0))
    s = grid.s.to(b.stds)
    scale = tr.algo.kl_scale(s[:-1, None], s[1:, None], b.stds)
    st = gaussian_step(tr.env.sde, grid.s[:-1], grid.s[1:], "ddim", 0.5)
    want = eta_factor(0.5) * tr.env.sde.int_g2(grid.s[1:], grid.s[:-1]) * st.std**2 / st.B**2
    assert torch.allclose(scale, want[:, None].expand_as(scale).to(scale), rtol=1e-10)
    assert torch.allclose(b.kl_steps * scale, tr.algo.penalty_steps(b))
