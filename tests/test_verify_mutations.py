"""Mutation tests of `python -m sacode verify`: a check must fail when the closed form it claims to verify is wrong.

For every family of checks we perturb the closed form (or the formula) it verifies -- a mean + delta, a variance
x (1 + delta), J* + delta, a KL x 2, V + delta, the finite-difference gradient x 1.5 + 0.3, the eta-factor dropped, a
time index shifted by one, alpha or sigma of an SDE scaled -- by monkeypatching the name the check module uses,
rerun the check, and assert that the rows claiming to test that closed form fail (and passed before). Additive
deltas are 4 times the tolerance of the row that must catch them (its stated resolution).

Simulations are cached inside the check modules (they do not depend on the closed forms), so a family is simulated
once. Two families run here with fewer samples than in `python -m sacode verify` (forward-marginal, and the reverse
samplers), to keep the unit tests fast: their mutations are caught by Richardson rows, which do not depend on n,
or by Monte-Carlo rows whose delta is scaled to the tolerance of this run.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import sacode.theory.kl as klmod
import sacode.theory.optimal as optmod
import sacode.theory.policy_eval as pe
import sacode.verify as verify
from sacode.dynamics.sde import OUSDE, VESDE, VPSDE
from sacode.theory.control import ScoreActionPolicy, action_of_transition
from sacode.theory.data import GaussianMixture
from sacode.theory.kl import GaussianLinearExample
from sacode.verify import control_checks as cc
from sacode.verify import optimal_checks as oc
from sacode.verify import policy_checks as pc
from sacode.verify import sde_checks as sc

CACHED = [sc._forward_samples, sc._reverse_samples, sc._mixture_pair, sc._exact_discrete_law,
          cc._optimal_em_trajectories,
          cc._state_dependent_estimates, oc._gauss_rollout, oc._mixture_pair, pc._trajectories, pc._grid_mean]


@pytest.fixture(scope="module", autouse=True)
def small_sde_samples():
    """Fewer samples for the SDE-layer simulations (module docstring); caches cleared before and after."""
    for f in CACHED:
        f.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sc, "N_FORWARD", 4000)
        mp.setattr(sc, "N_REVERSE", 4000)
        yield
    for f in CACHED:
        f.cache_clear()


_BASE: dict[str, dict] = {}


def run(family: str) -> dict:
    """The rows of one registered check, by name."""
    res = verify.registry()[family]()
    return {r.name: r for r in ([res] if isinstance(res, verify.CheckResult) else res)}


def base(family: str) -> dict:
    """The unperturbed rows of a family (computed once)."""
    if family not in _BASE:
        _BASE[family] = run(family)
    return _BASE[family]


def tol(family: str, row: str) -> float:
    return base(family)[row].tol


def assert_caught(family: str, rows: list[str]) -> None:
    """Rerun the (mutated) family: every row in ``rows`` passed unperturbed and fails now."""
    assert family in _BASE, "compute base(family) before patching anything"
    b = base(family)
    now = run(family)
    for row in rows:
        assert b[row].ok, f"{row} fails even without the mutation"
        assert not now[row].ok, f"{row} did not catch the mutation: {now[row]}"


# ------------------------------------------------------------------------------------------------
# sde checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,attr,factor,rows", [
    (VPSDE, "alpha", 1.2, ["forward-marginal/vp/mean/richardson", "forward-marginal/vp/var/richardson"]),
    (OUSDE, "sigma", 1.3, ["forward-marginal/ou/var/richardson"]),
    (VESDE, "sigma", 1.3, ["forward-marginal/ve/var/richardson"]),
    (OUSDE, "alpha", 1.2, ["forward-marginal/ou/mean/richardson", "forward-marginal/ou/var/richardson"]),
])
def test_forward_marginal_catches_scaled_sde(monkeypatch, cls, attr, factor, rows):
    base("forward-marginal")
    orig = getattr(cls, attr)
    monkeypatch.setattr(cls, attr, lambda self, s: factor * orig(self, s))
    assert_caught("forward-marginal", rows)


@pytest.mark.parametrize("law_name,label", [("reverse_sde_terminal_law", "sde-em"),
                                            ("pf_ode_terminal_law", "pf-heun")])
@pytest.mark.parametrize("what", ["mean", "var"])
def test_reverse_gauss_catches_wrong_terminal_law(monkeypatch, law_name, label, what):
    row = f"reverse-gauss/{label}/{what}/richardson"
    delta = 4 * tol("reverse-gauss", row)
    orig = getattr(sc, law_name)

    def law(data, sde):
        m, C = orig(data, sde)
        return (m + delta, C) if what == "mean" else (m, C * (1 + delta / float(C[0, 0])))
    monkeypatch.setattr(sc, law_name, law)
    assert_caught("reverse-gauss", [row])


def test_weak_order_catches_wrong_variance(monkeypatch):
    base("weak-order")
    sde = VPSDE(0.1, 2.0)
    _, c = sc.reverse_sde_terminal_law(sc.DATA_1D, sde)
    resolution = abs(sc._exact_discrete_law(2.0, "em", 320)[1] - float(c[0, 0]))   # the error at the finest K
    orig = sc.reverse_sde_terminal_law
    monkeypatch.setattr(sc, "reverse_sde_terminal_law", lambda d, s: (orig(d, s)[0], orig(d, s)[1] + 4 * resolution))
    assert_caught("weak-order", ["weak-order/em"])


@pytest.mark.parametrize("what", ["cov", "mean", "w"])
def test_reverse_mixture_catches_wrong_data_moments(monkeypatch, what):
    rows = [f"reverse-mixture/{m}/{what}" for m in ("sde-em", "pf-heun")]
    delta = 4 * max(tol("reverse-mixture", r) for r in rows)
    if what == "cov":
        orig = GaussianMixture.cov
        monkeypatch.setattr(GaussianMixture, "cov", lambda self: orig(self) + delta * torch.eye(2, dtype=torch.float64))
    elif what == "mean":
        orig = GaussianMixture.mean
        monkeypatch.setattr(GaussianMixture, "mean", lambda self: orig(self) + delta)
    else:
        orig_ring = sc.ring_mixture

        class ShiftedWeights:                          # the closed-form weights moved, the sampled law unchanged
            def __init__(self, ring):
                self.ring = ring

            @property
            def weights(self):
                return self.ring.weights + delta * torch.tensor([1, -1] * 4, dtype=torch.float64)

            def __getattr__(self, name):
                return getattr(self.ring, name)
        monkeypatch.setattr(sc, "ring_mixture", lambda: ShiftedWeights(orig_ring()))
    assert_caught("reverse-mixture", rows)


def test_dsm_minimum_catches_shifted_minimum(monkeypatch):
    b = base("dsm-minimum")
    deltas = {float(name.split("=")[1]): 4 * r.tol for name, r in b.items()}
    orig = sc.dsm_minimum_gaussian
    monkeypatch.setattr(sc, "dsm_minimum_gaussian", lambda d, sde, s: orig(d, sde, s) + deltas[round(float(s), 6)])
    assert_caught("dsm-minimum", list(b))


# ------------------------------------------------------------------------------------------------
# control checks (chapters 3-4)
# ------------------------------------------------------------------------------------------------
def test_step_policy_catches_dropped_jacobian(monkeypatch):
    base("control-step-policy")
    monkeypatch.setattr(cc, "transition_log_prob_via_policy",
                        lambda pol, t, x, x_next, step: pol.log_prob(t, x, action_of_transition(x, x_next, step)))
    assert_caught("control-step-policy", ["control-step-policy/ring2d/em-eta1/logp",
                                          "control-step-policy/ring2d/ddim-eta0.5/logp"])


def test_step_policy_catches_time_index_off_by_one(monkeypatch):
    base("control-step-policy")
    orig = ScoreActionPolicy.of_sampler.__func__

    def shifted(cls, sde, score_fn, grid, method="em", eta=1.0):
        pol = orig(cls, sde, score_fn, grid, method, eta)
        std = pol.std_fn()
        tk = grid.t[:-1]
        step = float(tk[1] - tk[0])
        return cls(score_fn, lambda t: std(torch.clamp(torch.as_tensor(t) + step, max=float(tk[-1]))), grid.T)
    monkeypatch.setattr(ScoreActionPolicy, "of_sampler", classmethod(shifted))
    assert_caught("control-step-policy", ["control-step-policy/gauss1d/em-eta1/logp",
                                          "control-step-policy/gauss1d/ddim-eta1/logp"])


def test_path_kl_catches_doubled_closed_form(monkeypatch):
    base("control-kl-path")
    orig = GaussianLinearExample.path_kl_closed
    monkeypatch.setattr(GaussianLinearExample, "path_kl_closed", lambda self, s_end=0.0: 2 * orig(self, s_end))
    assert_caught("control-kl-path", ["control-kl-path/quad-vs-analytic"])


def test_path_kl_catches_doubled_integral(monkeypatch):
    base("control-kl-path")
    orig = cc.shift_path_kl
    monkeypatch.setattr(cc, "shift_path_kl", lambda *a, **k: (2 * orig(*a, **k)[0], orig(*a, **k)[1]))
    assert_caught("control-kl-path", ["control-kl-path/riemann-sum/richardson", "control-kl-path/exact-sum/richardson",
                                      "control-kl-path/discrete-ddim1/richardson",
                                      "control-kl-path/torchsde-logqp/dt=1e-3"])


def test_path_kl_catches_time_index_off_by_one(monkeypatch):
    """The trajectory estimator pairing step k's weight with the score recorded at step k + 1."""
    base("control-kl-path")
    def shifted(traj, sde, score_pre, weight="exact", eta=None):
        later = dataclasses.replace(traj, scores=torch.cat([traj.scores[1:], traj.scores[-1:]]))
        return klmod.path_kl_from_trajectory(later, sde, score_pre, weight, eta)
    monkeypatch.setattr(cc, "path_kl_from_trajectory", shifted)
    assert_caught("control-kl-path", ["control-kl-path/mc-riemann/K=1000", "control-kl-path/mc-exact/K=1000"])


def test_path_kl_catches_wrong_state_dependent_value(monkeypatch):
    base("control-kl-path")
    orig_ode, orig_disc = cc._moment_ode_kl, cc._discrete_expected_kl
    monkeypatch.setattr(cc, "_moment_ode_kl", lambda *a: 2 * orig_ode(*a))
    assert_caught("control-kl-path", ["control-kl-path/state-dependent/richardson"])
    monkeypatch.setattr(cc, "_moment_ode_kl", orig_ode)
    delta = 4 * tol("control-kl-path", "control-kl-path/mc-state-dependent/K=200")
    monkeypatch.setattr(cc, "_discrete_expected_kl", lambda *a: orig_disc(*a) + delta)
    assert_caught("control-kl-path", ["control-kl-path/mc-state-dependent/K=200"])


def test_kl_eta_catches_dropped_eta_factor(monkeypatch):
    base("control-kl-eta")
    monkeypatch.setattr(klmod, "eta_factor", lambda eta: 1.0)
    monkeypatch.setattr(cc, "eta_factor", lambda eta: 1.0)
    assert_caught("control-kl-eta", [f"control-kl-eta/eta={e}/{r}" for e in ("0.5", "0.2")
                                     for r in ("em-chain = factor x riemann", "estimator = chain KL",
                                               "ddim-chain/richardson")])


@pytest.mark.parametrize("attr,rows", [
    ("terminal_kl_closed", ["terminal-kl/richardson"]),
    ("terminal_shift", ["terminal-shift/richardson"]),
    ("terminal_var_pre", ["Var_T", "terminal-kl/richardson"]),
    ("path_kl_closed", ["path-kl"]),
])
def test_dpi_catches_wrong_closed_forms(monkeypatch, attr, rows):
    base("control-kl-dpi")
    orig = getattr(GaussianLinearExample, attr)
    if attr == "path_kl_closed":
        monkeypatch.setattr(GaussianLinearExample, attr, lambda self, s_end=0.0: 2 * orig(self, s_end))
    else:
        monkeypatch.setattr(GaussianLinearExample, attr, lambda self: 2 * orig(self))
    assert_caught("control-kl-dpi", [f"control-kl-dpi/{p}/{r}" for p in ("gauss1d-linear", "gauss1d-linear-short")
                                     for r in rows])


# ------------------------------------------------------------------------------------------------
# optimal checks (chapter 5)
# ------------------------------------------------------------------------------------------------
def test_hjb_catches_wrong_value_function(monkeypatch):
    """V* + delta (T - t) sum(x): a wrong value function with the right terminal condition; delta is 4 x the
    check's absolute resolution (its relative tolerance times the largest HJB term)."""
    b = base("optimal-hjb")
    delta = {name.split("/")[1]: 4 * r.tol * float(r.note.split("max|term|=")[1]) for name, r in b.items()}
    orig = optmod.optimal_value
    monkeypatch.setattr(optmod, "optimal_value", lambda p, t, x: orig(p, t, x) + delta[p.name] * (
        p.sde.T - torch.as_tensor(t)) * x.reshape(x.shape[0], -1).sum(1))
    assert_caught("optimal-hjb", list(b))


def _perturbed(orig, change, only_default=True):
    """``orig`` (a closed form taking ``method``) with ``change`` applied to its result (by default only to the
    default method's, so that the check's independent computation stays right)."""
    def perturbed(p, method="auto", *a, **k):
        out = orig(p, method, *a, **k)
        return out if only_default and method != "auto" else change(out)
    return perturbed


def _shifted_law(orig, shift_mean=0.0, scale_cov=1.0, only_default=True):
    return _perturbed(orig, lambda out: dataclasses.replace(out, mean=out.mean + shift_mean,
                                                            cov=out.cov * scale_cov), only_default)


def _shifted_objective(orig, dJ=0.0, kl_factor=1.0, only_default=True):
    return _perturbed(orig, lambda out: dataclasses.replace(out, J=out.J + dJ, kl=out.kl * kl_factor),
                      only_default)


def test_identities_catch_wrong_objective(monkeypatch):
    base("optimal-identities")
    monkeypatch.setattr(oc, "optimal_objective", _shifted_objective(oc.optimal_objective, dJ=1e-6, kl_factor=2.0))
    assert_caught("optimal-identities", [f"optimal-identities/{p}/{r}" for p in oc.GAUSS_PRESETS
                                         for r in ("J-quadrature", "KL-Girsanov")])


def test_identities_catch_wrong_law(monkeypatch):
    base("optimal-identities")
    monkeypatch.setattr(oc, "optimal_terminal_law", _shifted_law(oc.optimal_terminal_law, shift_mean=1e-6))
    assert_caught("optimal-identities", [f"optimal-identities/{p}/law-quadrature" for p in oc.GAUSS_PRESETS])


@pytest.mark.parametrize("what", ["mean", "var", "J*", "KL"])
def test_mc_gauss_catches_wrong_optimum(monkeypatch, what):
    rows = [f"optimal-mc-gauss/{p}/{what}/richardson" for p in oc.GAUSS_PRESETS]
    delta = 4 * max(tol("optimal-mc-gauss", r) for r in rows)
    rel = 4 * max(tol("optimal-mc-gauss", r) / abs(base("optimal-mc-gauss")[r].closed_form) for r in rows)
    if what == "mean":
        monkeypatch.setattr(oc, "optimal_terminal_law", _shifted_law(oc.optimal_terminal_law, shift_mean=delta))
    elif what == "var":
        monkeypatch.setattr(oc, "optimal_terminal_law", _shifted_law(oc.optimal_terminal_law, scale_cov=1 + rel))
    elif what == "J*":
        monkeypatch.setattr(oc, "optimal_objective", _shifted_objective(oc.optimal_objective, dJ=delta))
    else:
        monkeypatch.setattr(oc, "optimal_objective", _shifted_objective(oc.optimal_objective, kl_factor=2.0))
    assert_caught("optimal-mc-gauss", rows)


def test_mc_gauss_catches_wrong_discrete_law(monkeypatch):
    """The Monte-Carlo rows compare with the exact discrete law: a wrong discrete law fails them."""
    rows = [f"optimal-mc-gauss/{p}/mean" for p in oc.GAUSS_PRESETS]
    delta = 4 * max(tol("optimal-mc-gauss", r) for r in rows)
    orig = oc._gauss_rollout

    def shifted(name):
        ro, disc = orig(name)
        return ro, dataclasses.replace(disc, mean=disc.mean + delta)
    monkeypatch.setattr(oc, "_gauss_rollout", shifted)
    assert_caught("optimal-mc-gauss", rows)


def test_naive_tilt_rejection_catches_naive_equal_to_optimum(monkeypatch):
    base("optimal-naive-tilt-rejected")
    monkeypatch.setattr(oc, "naive_tilt_law", lambda p: oc.optimal_terminal_law(p))
    assert_caught("optimal-naive-tilt-rejected", [f"optimal-naive-tilt-rejected/{p}" for p in oc.SHORT_PRESETS])


@pytest.mark.parametrize("what", ["mean", "cov", "w", "J*", "KL"])
def test_mc_mixture_catches_wrong_optimum(monkeypatch, what):
    row = {"mean": "optimal-mc-mixture/mean[0]", "cov": "optimal-mc-mixture/cov*", "w": "optimal-mc-mixture/w*",
           "J*": "optimal-mc-mixture/J*", "KL": "optimal-mc-mixture/KL"}[what]
    delta = 4 * tol("optimal-mc-mixture", row)
    orig_law, orig_obj = oc.optimal_terminal_law, oc.optimal_objective
    if what == "mean":
        monkeypatch.setattr(oc, "optimal_terminal_law", _shifted_law(orig_law, shift_mean=delta))
    elif what == "cov":
        monkeypatch.setattr(oc, "optimal_terminal_law", lambda p, *a, **k: dataclasses.replace(
            orig_law(p, *a, **k), cov=orig_law(p, *a, **k).cov + delta))
    elif what == "w":
        def law(p, *a, **k):
            L = orig_law(p, *a, **k)
            w = L.weights.clone()
            w[:2] += torch.tensor([delta, -delta], dtype=w.dtype)
            return dataclasses.replace(L, weights=w)
        monkeypatch.setattr(oc, "optimal_terminal_law", law)
    elif what == "J*":
        monkeypatch.setattr(oc, "optimal_objective", _shifted_objective(orig_obj, dJ=delta))
    else:
        monkeypatch.setattr(oc, "optimal_objective", _shifted_objective(orig_obj, kl_factor=2.0))
    assert_caught("optimal-mc-mixture", [row])


# ------------------------------------------------------------------------------------------------
# policy checks (chapter 6)
# ------------------------------------------------------------------------------------------------
class _ShiftedValue:
    def __init__(self, V, delta):
        self.V, self.delta = V, delta

    def __call__(self, t, x):
        return self.V(t, x) + self.delta

    def mean(self, *a):
        return self.V.mean(*a) + self.delta

    def __getattr__(self, name):
        return getattr(self.V, name)


def test_policy_value_catches_shifted_value(monkeypatch):
    rows = [r for r in base("policy-value") if r.endswith("/richardson")]
    delta = 4 * max(tol("policy-value", r) for r in rows)
    orig = pe.value_function
    monkeypatch.setattr(pe, "value_function", lambda *a: _ShiftedValue(orig(*a), delta))
    assert_caught("policy-value", rows + ["policy-value/E V(0,X0) = J"])


def test_policy_value_catches_wrong_grid_mean(monkeypatch):
    rows = [r for r in base("policy-value") if r.startswith("policy-value/V(") and not r.endswith("richardson")]
    delta = 4 * max(tol("policy-value", r) for r in rows)
    orig = pe.discrete_objective
    monkeypatch.setattr(pe, "discrete_objective",
                        lambda *a, **k: dataclasses.replace(orig(*a, **k), objective=orig(*a, **k).objective + delta))
    assert_caught("policy-value", rows)


def test_policy_q_catches_shifted_q(monkeypatch):
    delta = 4 * tol("policy-q", "policy-q/closed form = definition")
    orig = pe.q_rate
    monkeypatch.setattr(pe, "q_rate", lambda *a, **k: orig(*a, **k) + delta)
    assert_caught("policy-q", ["policy-q/closed form = definition"])


def test_policy_gradient_catches_wrong_finite_difference(monkeypatch):
    rows = [r for r in base("policy-gradient") if r.endswith("/richardson")]
    orig = pc._directional_fd
    monkeypatch.setattr(pc, "_directional_fd", lambda *a, **k: (1.5 * orig(*a, **k)[0] + 0.3, orig(*a, **k)[1]))
    assert len(rows) == 16
    assert_caught("policy-gradient", rows)


def test_policy_gradient_catches_wrong_exact_gradient(monkeypatch):
    rows = [r for r in base("policy-gradient") if r.endswith("exact vs FD")]
    orig = pe.exact_gradient
    monkeypatch.setattr(pe, "exact_gradient", lambda *a, **k: 1.5 * orig(*a, **k))
    assert_caught("policy-gradient", [r for r in rows if "/nt/" in r])


def test_policy_gradient_catches_wrong_grid_mean(monkeypatch):
    rows = [r for r in base("policy-gradient") if r.count("/") == 4 and not r.endswith("FD")]
    delta = 4 * max(tol("policy-gradient", r) for r in rows)
    orig = pe.expected_estimate
    monkeypatch.setattr(pe, "expected_estimate", lambda *a, **k: orig(*a, **k) + delta)
    pc._grid_mean.cache_clear()
    try:
        assert_caught("policy-gradient", rows)
    finally:
        pc._grid_mean.cache_clear()


def test_policy_pd_catches_wrong_formula(monkeypatch):
    rows = [r for r in base("policy-pd") if r.endswith("/formula")]
    orig = pe.performance_difference
    monkeypatch.setattr(pe, "performance_difference",
                        lambda *a, **k: dataclasses.replace(orig(*a, **k), pdl=orig(*a, **k).pdl + 1e-6))
    assert_caught("policy-pd", rows)


def test_policy_optimal_catches_shifted_optimum(monkeypatch):
    rows = [r for r in base("policy-optimal") if r.endswith("J(theta*) = J*")]
    orig = pe.affine_optimal_objective
    monkeypatch.setattr(pe, "affine_optimal_objective", lambda *a: orig(*a) + 4 * pc.EXACT_TOL)
    assert_caught("policy-optimal", rows)


def test_policy_discrete_catches_shifted_objective(monkeypatch):
    rows = list(base("policy-discrete"))
    orig = pe.objective
    JK400 = None

    def shifted(*a, **k):
        out = orig(*a, **k)
        return dataclasses.replace(out, objective=out.objective + 4 * abs(JK400))
    fam, p = pc._family("gauss1d-quadratic")
    J = orig(fam, pc.THETA_NT, p.reward, p.beta).objective
    JK400 = pe.discrete_objective(fam, pc.THETA_NT, p.reward, p.beta, pc.TimeGrid.uniform(1.0, 400)).objective - J
    monkeypatch.setattr(pe, "objective", shifted)
    assert_caught("policy-discrete", rows)


# ------------------------------------------------------------------------------------------------
# the contract of the table
# ------------------------------------------------------------------------------------------------
def test_every_family_has_a_mutation_test():
    tested = {"forward-marginal", "reverse-gauss", "weak-order", "reverse-mixture", "dsm-minimum",
              "control-step-policy", "control-kl-path", "control-kl-eta", "control-kl-dpi", "optimal-hjb",
              "optimal-identities", "optimal-mc-gauss", "optimal-naive-tilt-rejected", "optimal-mc-mixture",
              "policy-value", "policy-q", "policy-gradient", "policy-pd", "policy-optimal", "policy-discrete"}
    identity_only = {"optimal-terminal-condition"}      # V*(T, x) = r(x) holds by algebra (an identity row)
    assert set(verify.registry()) == tested | identity_only


def test_monte_carlo_rows_have_no_extra_allowance():
    """Every Monte-Carlo row of the cached families has tol = z se with z <= 5 (nothing added)."""
    for family in ("optimal-mc-gauss", "optimal-mc-mixture", "control-kl-path", "policy-gradient"):
        for r in base(family).values():
            assert r.kind in verify.KINDS
            if r.kind == "monte-carlo":
                assert r.se is not None and r.z is not None and r.z <= 5
                assert r.tol <= r.z * r.se * (1 + 1e-12)


def test_mutation_deltas_are_resolvable():
    """The perturbations above are 4 x the row tolerance, so every row they target has a finite, positive tol."""
    for family in ("reverse-gauss", "optimal-mc-gauss", "policy-value"):
        for r in base(family).values():
            assert np.isfinite(r.tol) and r.tol > 0, r
