"""Stable Diffusion + LoRA on the engine (chapter 12), checked on the tiny random pipeline built locally (CPU).

Exactness checks compare with diffusers itself: the DDIM step and a whole pipeline call. diffusers computes its
scalar coefficients from float32 ``alphas_cumprod`` with float32 powers, so the tolerances are a few float32 ulps
(EPS32) of the quantities involved, per step; a wrong formula errs by O(1).
"""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sacode.engine.algos import Transitions  # noqa: E402
from sacode.runs import make_config  # noqa: E402
from sacode.dynamics.transition import Transition
from sacode.theory.control import rollout  # noqa: E402
from sacode.runs import make_trainer  # noqa: E402
from sacode.dynamics.samplers import ddim_step  # noqa: E402
from sacode.envs.sd.env import SDEnv, adapters_disabled  # noqa: E402
from sacode.envs.sd.policy import LoRAScorePolicy  # noqa: E402
from sacode.envs.sd.prompts import PromptSampler  # noqa: E402
from sacode.envs.sd.rewards import (AestheticReward, JpegCompressibility, JpegIncompressibility,  # noqa: E402
                               MissingRewardWeights, make_reward)
from sacode.envs.sd.schedule import ScheduleSDE, scheduler_grid, scheduler_timesteps  # noqa: E402
from sacode.envs.sd.task import load_pipeline, resolve_model  # noqa: E402
from sacode.envs.sd.tiny import tiny_pipeline_path  # noqa: E402

from sacode.verify import Z  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_out")
RUN = {"progress": "false", "image_every": "0", "export_lora": "false"}


def sd15_scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def make_env(dtype=torch.float64, prompts="a cat", guidance=3.0, reward=None):
    pipe = load_pipeline("tiny", torch_dtype=dtype)
    return SDEnv(pipe, reward or JpegCompressibility(), PromptSampler.named(prompts), guidance=guidance,
                 resolution=32, dtype=dtype)


def perturb_lora(policy, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ------------------------------------------------------------------------------------------------------------------
# the schedule as an SDE; the DDIM step; the whole sampler
# ------------------------------------------------------------------------------------------------------------------
def test_schedule_sde_reads_alphas_cumprod_exactly():
    sch = sd15_scheduler()
    sde = ScheduleSDE.from_scheduler(sch)
    tau = torch.arange(1000)
    ac = sch.alphas_cumprod.double()
    s = sde.s_of_timestep(tau)
    assert torch.allclose(sde.alpha_bar(s), ac, rtol=8 * EPS64, atol=0)
    assert float(sde.alpha(torch.tensor(0.0))) == 1.0 and float(sde.sigma(torch.tensor(0.0))) == 0.0
    assert torch.allclose(sde.alpha(s) ** 2 + sde.sigma(s) ** 2, torch.ones(1000, dtype=torch.float64), atol=4 * EPS64)
    # timestep(s) inverts s(tau) even from float32 diffusion times (the snapping in the one conversion function)
    assert torch.equal(sde.timestep(s.float()), tau.double())
    # the VP relations f = -g^2/2 and int_{s0}^{s1} g^2 = log abar(s0) - log abar(s1) (g^2 is piecewise constant)
    s0, s1 = sde.s_of_timestep(99), sde.s_of_timestep(499)
    mids = (torch.arange(100, 500, dtype=torch.float64) + 0.5) / 1000
    assert math.isclose(float(sde.g2(mids).sum() / 1000), float(sde.int_g2(s0, s1)), rel_tol=1e-12)
    assert torch.allclose(sde.f_coef(mids), -0.5 * sde.g2(mids), rtol=0, atol=0)


@pytest.mark.parametrize("K", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_diffusers_ddim_step(K, eta):
    """sacode's ddim_step with score = -eps/sigma on the scheduler's own grid == DDIMScheduler.step."""
    sch = sd15_scheduler()
    sde = ScheduleSDE.from_scheduler(sch)
    grid, taus = scheduler_grid(sch, K, sde), scheduler_timesteps(sch, K)
    assert taus[0] == 1000 - 1000 // K + 1 and taus[-1] == 0 and abs(float(grid.s[-1]) - 1e-3) < 1e-15
    g = torch.Generator().manual_seed(K)
    for k in range(K):
        x, eps, z = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ref = sch.step(eps, taus[k], x, eta=eta, variance_noise=z).prev_sample
        score = -eps / sde.sigma(grid.s[k])
        st = ddim_step(sde, lambda s, y: score, x, grid.s[k], grid.s[k + 1], z if eta > 0 else None, eta=eta)
        scale = float(x.abs().max() + eps.abs().max() / sde.alpha(grid.s[k]) + z.abs().max())
        assert float((st.x_next - ref).abs().max()) <= 4 * EPS32 * scale, (k, eta)
        var = sch._get_variance(taus[k], taus[k] - 1000 // K) if taus[k] - 1000 // K >= 0 else None
        if var is not None:
            assert math.isclose(float(st.std[0]), eta * float(var) ** 0.5, rel_tol=8 * EPS32, abs_tol=1e-12)


@pytest.fixture(scope="module")
def env64():
    return make_env(torch.float64)


@pytest.fixture(scope="module")
def policy64(env64):
    return LoRAScorePolicy(env64, rank=4, target_modules=TARGETS)


def test_rollout_reproduces_the_diffusers_pipeline(env64, policy64):
    """Our sampler (guided score -> ddim_step on the scheduler grid, eta = 1) from the same latents and the same
    noise draws gives the latents of ``pipe(...)`` (LoRA at its zero initialisation)."""
    K, n = 5, 3
    with torch.no_grad():
        for name, p in policy64.named_parameters():
            if "lora_B" in name:
                p.zero_()
    b = rollout(env64, policy64, env64.time_grid(K), Transition(env64.sde, "ddim", 1.0), n,
                torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    lat = torch.randn((n, *env64.event_shape), generator=g, dtype=torch.float64)
    ref = env64.pipe(["a cat"] * n, height=32, width=32, num_inference_steps=K, guidance_scale=3.0, eta=1.0,
                     latents=lat, generator=g, output_type="latent").images
    assert torch.equal(b.xs[0], lat)
    assert float((b.xs[-1] - ref).abs().max()) <= 4 * K * EPS32 * float(ref.abs().max())
    assert float(b.kl_path.abs().max()) == 0.0              # policy == pretrained at initialisation


def test_recomputed_log_prob_equals_stored_and_pretrained_is_adapter_off(env64, policy64):
    perturb_lora(policy64)
    grid, transition = env64.time_grid(4), Transition(env64.sde, "ddim", 1.0)
    b = rollout(env64, policy64, grid, transition, 4, torch.Generator().manual_seed(1))
    assert (b.kl_steps > 0).all()
    tr = Transitions.from_rollout(b)
    perm = torch.randperm(tr.i.numel(), generator=torch.Generator().manual_seed(2))    # other batch compositions
    for idx in perm.split(5):
        prompts = b.cond.index(tr.i[idx])
        lp = transition.log_prob(lambda s, x: policy64(s, x, prompts), tr.x[idx], tr.x_next[idx], tr.s_cur[idx],
                              tr.s_next[idx])
        # float64 rounding of the UNet (~1e-15 relative), amplified by 1/c_k^2 at the smallest transition std
        tol = 1e3 * EPS64 * tr.x[0].numel() / float(tr.std.min()) ** 2
        assert torch.allclose(lp, tr.logp_old[idx], rtol=0, atol=tol)
    # the pretrained score is the same UNet with the adapter disabled: equal to a fresh pipeline's UNet
    fresh = make_env(torch.float64)
    s, x = b.grid.s[1].expand(4), b.xs[1]
    ref = fresh.pretrained_score(s, x, b.cond)
    assert torch.equal(env64.pretrained_score(s, x, b.cond), ref)
    assert not torch.allclose(policy64(s, x, b.cond), ref)
    assert policy64.unet is env64.unet
    assert all(p.requires_grad for p in policy64.lora_parameters())        # restored after disable_adapters


def test_lora_export_round_trip_gives_the_same_images(tmp_path):
    """export_lora writes a standard diffusers LoRA; load_lora_weights in a fresh pipeline gives the same images."""
    env = make_env(torch.float32)
    pol = LoRAScorePolicy(env, rank=4, alpha=8.0, target_modules=TARGETS)
    perturb_lora(pol, std=0.2)
    path = pol.export_lora(tmp_path / "lora")
    assert path.exists()
    fresh = load_pipeline(str(tiny_pipeline_path()))
    base = fresh("a cat", height=32, width=32, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    fresh.load_lora_weights(str(tmp_path / "lora"))
    kw = dict(height=32, width=32, num_inference_steps=4, output_type="np")
    ours = env.pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    loaded = fresh("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert float(abs(ours - loaded).max()) <= 16 * EPS32
    assert float(abs(ours - base).max()) > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------------------------
def _lora(tr):
    return torch.cat([p.detach().reshape(-1) for p in tr.policy.lora_parameters()])


@pytest.mark.parametrize("algo", ["ctpo", "ddpo"])
def test_short_run_changes_lora_and_raises_compressibility(tmp_path, algo):
    cfg = make_config("sd-tiny-compressibility", algo, "class", 0, RUN | {"eval_every": "0"})
    tr = make_trainer(cfg, tmp_path)
    before = _lora(tr).clone()
    with adapters_disabled(tr.env.unet):
        r0 = tr.evaluate(n=32, seed=7).rewards.double()
    tr.run()
    r1 = tr.evaluate(n=32, seed=7).rewards.double()
    assert not torch.equal(before, _lora(tr))
    se = math.sqrt(float(r0.var() / r0.numel() + r1.var() / r1.numel()))
    assert float(r1.mean() - r0.mean()) > Z * se, (float(r0.mean()), float(r1.mean()), se)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == cfg.iterations and "terminal_mean" in json.loads(lines[0])     # 64-dim latents: logged


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    cfg = make_config("sd-tiny-compressibility", "ctpo", "ci", 3, RUN | {"iterations": "4", "checkpoint_every": "2"})
    a = make_trainer(cfg, tmp_path / "a")
    a.run()
    make_trainer(cfg.replace(iterations=2), tmp_path / "b").run()
    c = make_trainer(cfg, tmp_path / "b")
    c.load()
    c.run()
    assert torch.equal(_lora(a), _lora(c))
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "wall_s"}
                       for ln in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "a") == strip(tmp_path / "b")
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert all("lora_" in k for k in ck["policy"])                          # LoRA only, not the UNet
    from sacode.envs.sd.report import export_run
    res = json.loads(export_run(tmp_path / "b", tmp_path / "fig").read_text())
    assert res["algo"] == "ctpo" and len(res["curves"]) == 4 and res["summary"]["reward_name"] == "compressibility"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    from accelerate.state import AcceleratorState

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes",
                      GLOO_SOCKET_IFNAME="lo")
    AcceleratorState._reset_state(reset_partial_state=True)       # forget the parent's single-process state
    cfg = make_config("sd-tiny-compressibility", "ctpo", "ci", 0, RUN | {"iterations": "2"})
    tr = make_trainer(cfg, out)
    assert tr.world == world and tr.rank == rank
    init = _lora(tr).clone()
    first = rollout(tr.env, tr.policy, tr.env.time_grid(cfg.K), tr.transition, 2, torch.Generator().manual_seed(rank))
    tr.run()
    torch.save({"lora": _lora(tr), "init": init, "value": [p.detach() for p in tr.algo.value.parameters()],
                "x": first.xs[-1]}, os.path.join(out, f"params-{rank}.pt"))
    tr.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_process_gloo_data_parallel_keeps_ranks_identical(tmp_path):
    """accelerate + DDP over gloo on CPU: after training steps on different samples both ranks hold the same LoRA and
    value parameters."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    p0, p1 = (torch.load(tmp_path / f"params-{r}.pt") for r in (0, 1))
    assert not torch.equal(p0["x"], p1["x"])                          # the ranks sampled different data
    assert torch.equal(p0["lora"], p1["lora"]) and not torch.equal(p0["lora"], p0["init"])
    assert all(torch.equal(a, b) for a, b in zip(p0["value"], p1["value"]))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["samples_used"] == 2 * 2 * 4 and (tmp_path / "rng-rank1.pt").exists()


# ------------------------------------------------------------------------------------------------------------------
# rewards, options, errors
# ------------------------------------------------------------------------------------------------------------------
def test_jpeg_rewards_order_smooth_and_noisy_images():
    g = torch.Generator().manual_seed(0)
    imgs = torch.cat([torch.full((2, 3, 64, 64), 0.5), torch.rand(2, 3, 64, 64, generator=g)])
    c, i = JpegCompressibility()(imgs, [""] * 4), JpegIncompressibility()(imgs, [""] * 4)
    assert torch.equal(c, -i) and (i > 0).all()
    assert float(c[:2].min()) > float(c[2:].max())                  # a flat image compresses better than noise


def test_aesthetic_reward_from_local_files(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from sacode.envs.sd.rewards import AestheticMLP, clip_preprocess
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                                          intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    mlp = AestheticMLP(16)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pth")
    r = make_reward("aesthetic", {"aesthetic_mlp": str(tmp_path / "mlp.pth"), "clip_model": str(tmp_path / "clip")})
    imgs = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = r(imgs, ["x"] * 3)
    with torch.no_grad():
        emb = clip.eval()(pixel_values=clip_preprocess(imgs, 32)).image_embeds
        ref = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(1)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert imgs.grad is not None and float(imgs.grad.abs().sum()) > 0     # differentiable
    with pytest.raises(MissingRewardWeights, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        AestheticReward(tmp_path / "nope.pth", tmp_path / "clip")
    with pytest.raises(MissingRewardWeights, match="openai/clip-vit-large-patch14"):
        AestheticReward(tmp_path / "mlp.pth", tmp_path / "no-clip")


def test_imagereward_says_what_is_missing(tmp_path):
    with pytest.raises(MissingRewardWeights, match="pip install image-reward|ImageReward.pt"):
        make_reward("imagereward", {"imagereward": str(tmp_path)})


def test_model_resolution_options_and_missing_weights(monkeypatch):
    monkeypatch.setenv("SACODE_SD_MODEL", "/some/folder")
    assert resolve_model("", tiny=False) == "/some/folder" and resolve_model("x/y") == "x/y"
    assert resolve_model("", tiny=True) == "tiny"
    monkeypatch.delenv("SACODE_SD_MODEL")
    assert resolve_model("") == "runwayml/stable-diffusion-v1-5"
    with pytest.raises(FileNotFoundError, match="allow_download=true"):
        load_pipeline("sacode-test/no-such-model")
    cfg = make_config("sd15-compressibility", "ctpo", "full", 0, {"model": "/w/sd15", "lora_rank": "8"})
    assert cfg.options["model"] == "/w/sd15" and cfg.options["lora_rank"] == 8
    assert cfg.K == 50 and cfg.eta == 1.0 and cfg.grid == "native" and cfg.method == "ddim"
    assert math.isclose(cfg.clip, 4 * 64 * 64 * 1.5e-5)
    with pytest.raises(KeyError, match="options of this preset: .*lora_rank"):
        make_config("sd-tiny-compressibility", "ctpo", "ci", 0, {"lora_rnk": "8"})


def test_throughput_measurement_runs_on_the_tiny_pipeline():
    """The benchmark's measuring code (sampling, rollout, one ctpo and one ddpo update with the sd15 settings), on the
    tiny pipeline on CPU: the GPU benchmark differs only in the model size, the device and the timer."""
    from sacode.bench.sd import _timed_cpu, measure
    env = make_env(torch.float32, prompts="animals")
    pol = LoRAScorePolicy(env, rank=4)
    rows = measure(env, pol, K=2, n=2, algos=["ctpo", "ddpo"], timed=_timed_cpu)
    assert all(rows[k] > 0 for k in ("sample_images_per_s", "rollout_images_per_s", "ctpo_update_s", "ddpo_update_s"))


def test_benchmark_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from sacode.bench.sd import sd_throughput
    with pytest.raises(SystemExit, match="needs CUDA"):
        sd_throughput("ci")


# ------------------------------------------------------------------------------------------------------------------
# GPU (skipped here: run with --run-gpu on a CUDA machine)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_tiny_run_bf16_and_lora_export(tmp_path):
    cfg = make_config("sd-tiny-compressibility", "ctpo", "ci", 0, RUN | {"export_lora": "true", "amp": "bf16"})
    tr = make_trainer(cfg, tmp_path)
    assert tr.env.device.type == "cuda" and tr.env.amp == "bf16"
    s = tr.run()
    assert math.isfinite(s["reward"]) and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.gpu
def test_gpu_throughput_benchmark_tiny_setting():
    from sacode.bench.sd import sd_throughput
    res = sd_throughput("ci")
    r = res["results"]
    run = r["runs"][0]
    assert run["sample_images_per_s"] > 0 and run["algos"]["ctpo"]["s_per_image"] > 0
    assert run["algos"]["ddpo_ckpt"]["update_s_per_image"] > 0 and 0 < r["sample_fraction_of_peak"] < 1
    assert 800 < r["unet_params_M"] < 900
