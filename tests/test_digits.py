"""Chapter 11: the digits data, the committed pretrained models, rewards, metrics, the engine task and the bench."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sacode.envs.digits import data as D
from sacode.envs.digits.pretrain import CLF_JSON, UNET_JSON, load_classifier, load_score_model, sample
from sacode.envs.digits.quality import frechet_distance, image_metrics, mean_pairwise_distance
from sacode.envs.digits.rewards import ClassLogProb, JPEGCompressibility, TotalInk

# FD of 200 pretrained samples (DDIM, K = 10) to the held-out digits must stay below this. The committed model
# gives about 60 at n = 200 (the n = 1000 values are in sacode/envs/digits/checkpoints/digits-unet.json); uniform noise images
# give about 800 and the training digits themselves about 30 at this n (finite-n bias of a 64-d FD), so the
# threshold separates "looks like digits" from "does not" with a wide margin either way.
FD_THRESHOLD = 150.0


def test_data_scaling_and_split():
    x, y = D.digits("train")
    xh, yh = D.digits("heldout")
    xa, ya = D.digits("all")
    assert x.shape == (1437, 1, 8, 8) and xh.shape == (360, 1, 8, 8) and xa.shape == (1797, 1, 8, 8)
    assert x.dtype == torch.float32 and float(xa.min()) == -1.0 and float(xa.max()) == 1.0
    # raw pixel values are integers 0..16: the scaled values are exactly v/8 - 1 and invert exactly
    v = D.to_pixels(xa)
    assert torch.equal(v, v.round()) and torch.equal(D.to_unit(v), xa)
    # the split is a partition of the data set
    both = torch.cat([x, xh]).reshape(-1, 64)
    assert both.shape[0] == xa.shape[0] and torch.equal(torch.sort(torch.cat([y, yh])).values, torch.sort(ya).values)
    with pytest.raises(ValueError, match="unknown split"):
        D.digits("test")


def test_committed_checkpoints_and_records():
    clf_rec, unet_rec = json.loads(CLF_JSON.read_text()), json.loads(UNET_JSON.read_text())
    for rec, cmd in ((clf_rec, "digits-classifier"), (unet_rec, "digits")):
        assert rec["command"] == f"python -m sacode pretrain {cmd}" and "seed" in rec["train"]
    assert clf_rec["heldout_accuracy"] > 0.97
    xh, yh = D.digits("heldout")
    acc = float((load_classifier().logits(xh).argmax(-1) == yh).double().mean())
    assert acc == pytest.approx(clf_rec["heldout_accuracy"], abs=1e-9)
    q = unet_rec["sample_quality"]
    assert q["pretrained"]["ddim-eta1-K10"]["fd"] < q["references"]["fd_uniform_noise_vs_heldout"] / 5


def test_pretrained_samples_look_like_digits():
    clf = load_classifier()
    x = sample(load_score_model(), 200, K=10, method="ddim", eta=1.0, seed=1)
    m = image_metrics(clf, x)
    assert m["sample_quality"] < FD_THRESHOLD, m
    # all ten digits appear: class entropy close to log 10 (a collapsed model would be far below)
    assert m["class_entropy"] > math.log(10) - 0.25


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 8, generator=g, dtype=torch.float64)
    m = torch.linspace(-1, 1, 8, dtype=torch.float64)
    # equal clouds: 0; a shifted copy has the same covariance, so FD = ||shift||^2 exactly (up to sqrtm rounding)
    assert abs(frechet_distance(f, f)) < 1e-8
    assert frechet_distance(f, f + m) == pytest.approx(float((m**2).sum()), abs=1e-8)
    # scaled copy: m_b = c m_a, C_b = c^2 C_a, so FD = (1 - c)^2 (||m_a||^2 + tr C_a)
    c = 2.0
    ma, ca = f.mean(0), torch.cov(f.T)
    expected = (1 - c) ** 2 * float((ma**2).sum() + torch.trace(ca))
    assert frechet_distance(f, c * f) == pytest.approx(expected, rel=1e-8)


def test_diversity_metrics():
    x = -torch.ones(4, 1, 8, 8)
    assert mean_pairwise_distance(x) == 0.0
    y = torch.stack([-torch.ones(1, 8, 8), torch.ones(1, 8, 8)])
    assert mean_pairwise_distance(y) == pytest.approx(2 * 8.0)        # ||2 * ones(64)|| = 16


def test_rewards_protocol():
    clf = load_classifier()
    x, y = D.digits("heldout")
    x = x[:40]
    r3 = ClassLogProb(clf, 3)(x)
    assert r3.shape == (40,) and bool((r3 <= 0).all())
    # the class log-probabilities normalise: sum_c exp r_c(x) = 1 for every image
    total = torch.stack([ClassLogProb(clf, c)(x) for c in range(10)]).exp().sum(0)
    assert torch.allclose(total, torch.ones(40), atol=1e-5)
    # a per-sample target given as the condition
    rc = ClassLogProb(clf, None)(x, y[:40])
    assert rc.shape == (40,) and float(rc.mean()) > -0.2                # the classifier knows held-out digits
    with pytest.raises(ValueError, match="cond"):
        ClassLogProb(clf, None)(x)
    ink = TotalInk()
    assert ink(-torch.ones(2, 1, 8, 8)).tolist() == [0.0, 0.0] and ink(5 * torch.ones(1, 1, 8, 8)).item() == 64.0
    jpeg = JPEGCompressibility()
    rj = jpeg(x[:8])
    assert rj.shape == (8,) and not jpeg.differentiable and ink.differentiable
    assert float(jpeg(-torch.ones(1, 1, 8, 8))) > float(rj.max())         # a blank page compresses best
    with pytest.raises(ValueError, match="shape"):
        ink(torch.zeros(3, 64))


def test_score_cache_is_transparent():
    from sacode.envs.digits.task import DIGITS_PRESETS, DigitsEnv

    env = DigitsEnv(DIGITS_PRESETS["digits-class3"])
    g = torch.Generator().manual_seed(0)
    x = env.sample_init(16, g)
    s = torch.full((16,), 0.5)
    a = env.pretrained_score(s, x)
    b = env.pretrained_score(s[:8], x[:8])                  # a hit: bit-identical rows
    assert torch.equal(a[:8], b) and env._cached.hits == 8
    with torch.no_grad():
        direct = env.score_model(s, x)
    assert torch.allclose(a, direct, atol=1e-5)
    xg = x.clone().requires_grad_(True)                     # gradients bypass the cache and flow to x
    env.pretrained_score(s, xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_ctpo_ci_run_changes_policy(tmp_path):
    from sacode.runs import make_config
    from sacode.runs import make_trainer

    cfg = make_config("digits-class3", "ctpo", "ci", 0, {"progress": False})
    assert cfg.method == "ddim" and cfg.K == DIGITS_CI_K()
    tr = make_trainer(cfg, tmp_path)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    s = tr.run()
    after = list(tr.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    for k in ("reward_pretrained", "reward_final", "kl_path", "sample_quality_pretrained", "sample_quality_final",
              "samples_used", "wall_s"):
        assert k in s and math.isfinite(s[k]), k
    assert s["kl_path"] > 0 and s["samples_used"] == cfg.iterations * cfg.batch
    # no policy beats the Donsker-Varadhan bound J* = beta log E_pre e^{r/beta} (up to Monte-Carlo error)
    assert s["objective"] <= s["objective_opt_bound"] + 4 * (s["objective_se"] + s["reward_pretrained_se"])
    assert (tmp_path / "samples.png").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == cfg.iterations and "fd_batch" in json.loads(lines[-1])


def DIGITS_CI_K():
    from sacode.envs.digits.task import DIGITS_CONFIG
    return DIGITS_CONFIG.profiles["ci"]["K"]


def test_bench_digits_ci(tmp_path):
    from sacode.bench.digits import digits_benchmark

    res = digits_benchmark(profile="ci", seeds=1, presets=None, algos=["ctpo", "ddpo"], cache=tmp_path / "cache",
                 out=tmp_path)
    assert [r["algo"] for r in res["algorithms"]] == ["ctpo", "ddpo"]
    assert {(r["algo"], r["beta"]) for r in res["beta_sweep"]} == {(a, b) for a in ("ctpo", "ddpo") for b in (0.0, 1.0)}
    assert {g["K"] for g in res["time_grids"]} == set(res["eval_ks"]) and "table" in res
    assert (tmp_path / "bench-digits.png").exists() and (tmp_path / "digits-samples.png").exists()
    from sacode.envs.digits.data import decode_images, encode_images
    x = D.digits("heldout")[0][:4]
    assert decode_images(res["algorithms"][0]["images"]).shape[1:] == (1, 8, 8)
    assert torch.allclose(decode_images(encode_images(x)), x, atol=0.5 / 127.5 + 1e-6)   # half a grey level
