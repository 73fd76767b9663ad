"""The cost of Stable Diffusion v1.5 without its weights (chapter 12): the random-weight architecture, the FLOP and
memory counters of ``bench sd-cost``, and the CPU smoke path of ``bench sd-throughput``.

Each counter is checked against an independent count: the configurations against SD v1.5's published parameter
counts, FlopCounterMode's UNet total against a layer-by-layer count from module shapes, the memory counter against
closed-form activation sizes and against the same counter on real CPU tensors, the engine's call counts against the
closed form of the rollout and the updates.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sacode.bench.memory import CudaAutocastEmulation, LiveTensorBytes, saved_for_backward_bytes  # noqa: E402
from sacode.envs.sd.sd15 import (SD15_PARAMETERS, CostOnlyModelWarning, build_sd15_random,  # noqa: E402
                                 parameter_counts, sd15_config, sd15_modules)


# ------------------------------------------------------------------------------------------------------------------
# the architecture
# ------------------------------------------------------------------------------------------------------------------
def test_sd15_configs_reproduce_the_published_parameter_counts():
    mods = sd15_modules("meta")
    assert parameter_counts(mods) == SD15_PARAMETERS
    assert sd15_config("unet")["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd15_config("vae")["scaling_factor"] == 0.18215
    # the check can fail: one layer fewer per block is a different network
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        smaller = UNet2DConditionModel(**(sd15_config("unet") | {"layers_per_block": 1}))
    assert sum(p.numel() for p in smaller.parameters()) != SD15_PARAMETERS["unet"]


def test_sd15_random_pipeline_builds_offline_through_load_pipeline_and_warns():
    from sacode.envs.sd.task import load_pipeline

    with pytest.warns(CostOnlyModelWarning, match="RANDOM weights.*measuring time, memory and FLOPs only"):
        pipe = load_pipeline("sd15-random", device="meta")
    assert sum(p.numel() for p in pipe.unet.parameters()) == SD15_PARAMETERS["unet"]
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    with pytest.warns(CostOnlyModelWarning):
        assert build_sd15_random("meta").vae.config.scaling_factor == 0.18215


# ------------------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------------------
def _layer_flops(unet, x, t, e) -> int:
    """2 x multiply-adds of every convolution, linear layer and attention product, from module shapes (hooks)."""
    from diffusers.models.attention_processor import Attention

    total = 0

    def conv(m, a, o):
        nonlocal total
        total += 2 * o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin(m, a, o):
        nonlocal total
        total += 2 * o.numel() * m.in_features

    def attn(m, a, kw, o):
        nonlocal total
        h = a[0] if a else kw["hidden_states"]
        enc = kw.get("encoder_hidden_states")
        b, sq = h.shape[0], h.shape[-2] * h.shape[-1] if h.ndim == 4 else h.shape[1]
        sk = enc.shape[1] if enc is not None else sq
        total += 2 * 2 * b * sq * sk * m.inner_dim                    # q k^T and (softmax) v

    hooks = []
    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lin))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attn, with_kwargs=True))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=e)
    for h in hooks:
        h.remove()
    return total


def test_unet_flops_match_a_layer_by_layer_count():
    from sacode.bench.sd_cost import count_flops, unet_inputs

    unet = sd15_modules("meta")["unet"]
    x, t, e = unet_inputs(1, 512)
    counted = count_flops(lambda: unet(x, t, encoder_hidden_states=e))
    assert counted == _layer_flops(unet, x, t, e)
    assert 0.79e12 < counted < 0.82e12                   # SD v1.5's UNet: about 0.4 T multiply-adds at 64 x 64


def test_engine_calls_follow_the_rollout_and_the_updates():
    """Rows per image: guidance doubles every UNet call; the rollout evaluates policy and pretrained score at each
    of K steps and rewards the final image; training back-propagates every stored step; ctpo's structured value
    decodes and rewards x0_hat at every state, and evaluates V_phi at K + 1 states and fits it at K."""
    from sacode.bench.sd_cost import engine_calls

    K = 3
    c, d = engine_calls("ctpo", K), engine_calls("ddpo", K)
    for calls in (c, d):
        assert calls["unet_policy"] == 2 * K and calls["unet_pretrained"] == 2 * K and calls["unet_train"] == 2 * K
    assert c["vae_decode"] == c["reward_images"] == K + 1
    assert c["value_forward"] == K + 1 and c["value_train"] == K
    assert d["vae_decode"] == d["reward_images"] == 1 and "value_forward" not in d


def test_image_flops_and_time_model_arithmetic():
    from sacode.bench.sd_cost import PHASES, gpu_time_model, image_flops

    flops = {"unet_forward": 3, "unet_train": 7, "unet_train_checkpointed": 9, "vae_decode": 11,
             "value_forward": 1, "value_train": 2}
    calls = {"unet_policy": 4, "unet_pretrained": 4, "unet_train": 4, "vae_decode": 5, "value_forward": 5,
             "value_train": 4}
    f = image_flops(calls, flops, False)
    assert f[PHASES[0]] == 12 and f[PHASES[2]] == 55 and f[PHASES[3]] == 13 and f[PHASES[4]] == 28
    assert f["total"] == 12 + 12 + 55 + 13 + 28
    assert image_flops(calls, flops, True)[PHASES[4]] == 36
    m = gpu_time_model({"ctpo": 1e18}, 254e12, None)
    rate = m["sources"]["ddpo-wallclock"]["a100_tflops"]
    assert math.isclose(rate, 254 / 4.5)                  # 4 h x 8 GPUs / (100 x 256) = 4.5 A100-s per image
    assert math.isclose(m["hours"]["ddpo-wallclock|A100|ctpo"], 100 * 1e18 / (4 * rate * 1e12) / 3600)


# ------------------------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------------------------
def test_memory_counter_matches_closed_form_activations():
    """y = W2 silu(W1 x): autograd keeps h = W1 x (for silu) and silu(h) (for W2's gradient); n x h floats each."""
    n, d, h, o = 8, 16, 32, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w1 = torch.randn(h, d, generator=g, requires_grad=True)
    w2 = torch.randn(o, h, generator=g, requires_grad=True)
    with LiveTensorBytes() as live:
        y, saved = saved_for_backward_bytes(lambda: F.linear(F.silu(F.linear(x, w1)), w2), exclude=(x, w1, w2))
        after = live.current
        y.sum().backward()
        del y
    assert saved == 2 * n * h * 4
    assert after == 2 * n * h * 4 + n * o * 4                           # + the output
    assert live.current == (h * d + o * h) * 4                           # only the weight gradients remain
    keep = []
    with LiveTensorBytes() as live:                                      # the check can fail: a kept tensor counts
        keep.append(torch.ones(1000))
    assert live.current == 4000


def test_autocast_emulation_casts_like_cuda_and_flash_attention_saves_no_attention_matrix():
    with CudaAutocastEmulation(torch.bfloat16):
        a = F.linear(torch.randn(2, 4), torch.randn(3, 4))
        gn = F.group_norm(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16), 2)
        cat = torch.cat([a, torch.randn(2, 3)])
    assert a.dtype == torch.bfloat16 and gn.dtype == torch.float32 and cat.dtype == torch.float32
    b, h, s, dh = 1, 2, 64, 8
    q = torch.randn(b, h, s, dh, device="meta", requires_grad=True)    # on meta, PyTorch takes the math path

    def saved(flash):
        with CudaAutocastEmulation(None, flash_attention=flash):
            return saved_for_backward_bytes(lambda: F.scaled_dot_product_attention(q, q, q), exclude=(q,))[1]

    # the unfused (math) path keeps the s x s attention weights; the flash kernel keeps output and log-sum-exp
    assert saved(False) >= b * h * s * s * 4
    assert saved(True) == b * h * s * dh * 4 + b * h * s * 4


def test_memory_counter_gives_the_same_bytes_on_meta_and_on_cpu():
    from sacode.bench.sd_cost import meta_equals_cpu

    r = meta_equals_cpu()
    assert r["equal"], r
    assert r["cpu_ckpt"]["after_forward"] < r["cpu"]["after_forward"]      # checkpointing keeps less


# ------------------------------------------------------------------------------------------------------------------
# GPU peaks and the throughput benchmark's CPU path
# ------------------------------------------------------------------------------------------------------------------
def test_gpu_peak_table():
    from sacode.bench.gpus import gpu_peak, peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4 and peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA L4") == 121.0 and peak_bf16_tflops("NVIDIA L40S") is None
    assert peak_bf16_tflops("NVIDIA GeForce RTX 4090") == 165.2
    p = gpu_peak("Some Future GPU", measure=lambda: 123.0)
    assert p["peak_bf16_tflops"] == 123.0 and "measured" in p["peak_source"]


def test_throughput_benchmark_refuses_a_gpu_profile_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from sacode.bench.sd import sd_throughput
    with pytest.raises(SystemExit, match="needs CUDA"):
        sd_throughput("ci")


def _check_smoke(res):
    r = res["results"]
    run = r["runs"][0]
    assert run["sample_images_per_s"] > 0 and set(run["algos"]) == {"ctpo", "ddpo", "ctpo_ckpt", "ddpo_ckpt"}
    for a in run["algos"].values():
        assert a["s_per_image"] > a["update_s_per_image"] > 0 and a["predicted_update_GiB"] > 0
        assert all(math.isfinite(v) for v in (a["epoch_s"], a["s_per_image"]))
    assert run["ctpo_over_ddpo_equal_samples"] > 0 and "smoke profile" in res["table"]
    return r


def test_throughput_benchmark_code_path_on_the_tiny_pipeline(tmp_path):
    """Everything of ``bench sd-throughput`` but the SD v1.5 build: timing, FLOP and memory columns, the table."""
    from sacode.bench.sd import sd_throughput
    r = _check_smoke(sd_throughput("smoke", model="tiny", out=tmp_path))
    assert (tmp_path / "bench-sd-throughput.png").exists()
    assert r["model"] == "tiny" and r["calls_per_image"]["ctpo"]["vae_decode"] == 2      # K = 1: x_K and x0_hat


@pytest.mark.slow
def test_throughput_benchmark_smoke_on_sd15_random_at_64px():
    """The CPU smoke mode of the GPU benchmark on the random-weight SD v1.5 pipeline at 64 px (the code path only).
    Slow: building the 860 M-parameter UNet and a few passes at 64 px take about a minute on a free 2-core CPU."""
    from sacode.bench.sd import sd_throughput
    r = _check_smoke(sd_throughput("smoke"))
    assert 859 < r["unet_params_M"] < 860


def test_gpu_check_collects_steps_tests_and_run(tmp_path):
    import json

    from sacode.bench.gpu_check import collect

    (tmp_path / "steps.tsv").write_text("gpu-tests\t0\t12.5\tpytest -m gpu\nsd-throughput\t1\t3.0\tpython -m x\n")
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="0" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><skipped/></testcase>'
        '</testsuite></testsuites>')
    run = tmp_path / "train"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"reward": -1.0}))
    res = collect(tmp_path)
    assert [s["rc"] for s in res["steps"]] == [0, 1] and res["seconds"] == 15.5
    assert res["gpu_tests"]["skipped"] == 1 and res["gpu_tests"]["not_passed"] == ["t::b: skipped"]
    assert res["ctpo_two_iterations"]["summary"]["reward"] == -1.0
    assert res["ctpo_two_iterations"]["lora_loads"] == {"ok": False, "error": "no exported LoRA"}
    assert res["ok"] is False and res["sd_throughput"] is None
