"""``python -m sacode bench sd-cost``: FLOPs and memory of the Stable Diffusion v1.5 run, counted on a CPU.

Cost does not depend on the values of the weights, so everything here is counted on SD v1.5's exact architecture
(:mod:`sacode.envs.sd.sd15`) built on PyTorch's ``meta`` device: tensors with shapes and dtypes and no data, which
cost neither memory nor time. Nothing is downloaded. Three measurements, combined into one cost model:

1. **FLOPs per network call** at 512 px, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
   convolutions, attention): a UNet forward pass per row (classifier-free guidance evaluates two rows per image and
   step, unconditional and conditional), a LoRA training pass (forward and backward; only the LoRA matrices need
   weight gradients), the same with gradient checkpointing (which recomputes blocks in the backward pass), a VAE
   decode, the text encoder, the CLIP ViT-L/14 image tower of the aesthetic reward, and the latent value network.
2. **Calls per image**, counted by running the engine's real code (``rollout`` and the ``ctpo`` / ``ddpo``
   updates with the ``full`` profile's settings, K = 50 steps, guidance 7) on the tiny random pipeline with hooks on
   the UNet, VAE, reward and value network: the call pattern does not depend on the network's size.
3. **Memory** of each phase, counted op by op on ``meta`` tensors (:mod:`sacode.bench.memory`) with the casting
   rules of CUDA bf16 autocast and fused flash attention, the setting of the GPU run; plus the weights, LoRA and
   optimiser state and the stored rollout, from their sizes. The same counter on real CPU tensors gives the same
   bytes (checked here on the tiny UNet), so meta is not an approximation of the counter.

FLOPs per image = sum over networks of calls per image x FLOPs per call; per epoch x images per epoch (the paper's
512 for ctpo, 256 for ddpo, 4 GPUs). The GPU-time model divides FLOPs by an achieved FLOP/s whose source is stated:
DDPO's published wall-clock (about 4 h for 100 epochs of 256 images on 8 A100s, black2023ddpocode) divided into
*our* count of DDPO's FLOPs, a measured ``bench sd-throughput`` when one exists, and the 40 % target for reference.
"""
from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import fit_to_column
from .gpus import peak_bf16_tflops
from .memory import GiB, CudaAutocastEmulation, LiveTensorBytes, checkpointing_under

RESOLUTION = 512
SD_PRESET = "sd15-compressibility"
GPUS = 4                                          # the paper's runs: 4 GPUs
EPOCHS = 100
IMAGES_PER_EPOCH = {"ctpo": 512, "ddpo": 256}     # ctpo: 2 x 64 per GPU per epoch; ddpo: 64 (DDPO: 256 per epoch)
MICRO_BATCHES = (1, 2, 4)
# DDPO's reference code (kvablack/ddpo-pytorch, config/dgx.py): 100 epochs of 256 images, 50 DDIM steps, guidance in
# sampling and training, LoRA, fp16, SD v1.4 (SD v1.5's architecture), in "about 4 hours" on 8 A100s (its README)
DDPO_REFERENCE = {"gpus": 8, "gpu": "A100", "hours": 4.0, "epochs": 100, "images_per_epoch": 256}
TARGET_FRACTION = 0.40                            # the target for sampling, a reference, not a measurement


# ------------------------------------------------------------------------------------------------------------------
# the networks on meta
# ------------------------------------------------------------------------------------------------------------------
def paper_config(algo: str):
    """The ``full`` profile's configuration of the sd15 presets (the paper's per-GPU settings, chapter 12)."""
    from ..runs import make_config
    return make_config(SD_PRESET, algo, "full", 0)


def add_lora(unet, rank: int, targets) -> None:
    """The policy's adapter (:class:`sacode.envs.sd.policy.LoRAScorePolicy`): LoRA on ``targets``, matrices in
    float32 whatever the UNet's dtype."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=float(rank), init_lora_weights="gaussian",
                                target_modules=list(targets)))
    cast_training_params(unet, dtype=torch.float32)


def meta_modules(dtype: torch.dtype = torch.float32) -> dict:
    """SD v1.5's UNet (with the run's LoRA), VAE and text encoder on ``meta``, and the aesthetic reward's CLIP
    ViT-L/14 image tower."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ..envs.sd.sd15 import sd15_config, sd15_modules

    opt = paper_config("ctpo").options
    mods = sd15_modules("meta", dtype)
    add_lora(mods["unet"], int(opt["lora_rank"]), str(opt["lora_targets"]).split(","))
    with torch.device("meta"):
        mods["clip_vision"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**sd15_config("clip_vision"))).eval()
    return mods


def value_correction(resolution: int, device: str = "meta"):
    """The latent value network V_phi of the ``full`` profile (:mod:`sacode.envs.sd.value`) for SD v1.5's latents.
    It reads only shapes from its environment (and the pooled prompt embedding, here zeros of CLIP's width)."""
    from ..envs.sd.value import LatentValueCorrection

    cfg = paper_config("ctpo")
    f = resolution // 8
    env = SimpleNamespace(event_shape=(4, f, f), text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=768)),
                          device=torch.device(device), dtype=torch.float32, sde=SimpleNamespace(T=1.0),
                          prompts_of=lambda cond, n: [""] * n,
                          pooled_embedding=lambda prompts: torch.zeros(len(prompts), 768, device=device))
    return LatentValueCorrection(env, width=cfg.hidden, depth=cfg.depth)


def unet_inputs(rows: int, resolution: int, dtype=torch.float32, device="meta"):
    f = resolution // 8
    return (torch.randn(rows, 4, f, f, device=device, dtype=dtype), torch.full((rows,), 500.0, device=device),
            torch.randn(rows, 77, 768, device=device, dtype=dtype))


def count_flops(fn) -> int:
    """FLOPs (multiply-adds count 2) of fn() by PyTorch's FlopCounterMode."""
    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return int(fc.get_total_flops())


def component_flops(resolution: int = RESOLUTION) -> dict:
    """FLOPs of one call of each network, per row (one image or one guidance branch), at ``resolution``."""
    mods = meta_modules(torch.float32)
    unet, f = mods["unet"], resolution // 8

    def forward(rows):
        x, t, e = unet_inputs(rows, resolution)
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=e)

    def train(rows):
        x, t, e = unet_inputs(rows, resolution)
        unet(x, t, encoder_hidden_states=e).sample.float().square().sum().backward()

    out = {"unet_forward": count_flops(lambda: forward(1)), "unet_forward_2_rows": count_flops(lambda: forward(2)),
           "unet_train": count_flops(lambda: train(1))}
    unet.enable_gradient_checkpointing()
    out["unet_train_checkpointed"] = count_flops(lambda: train(1))
    unet.disable_gradient_checkpointing()
    with torch.no_grad():
        out["vae_decode"] = count_flops(lambda: mods["vae"].decode(torch.randn(1, 4, f, f, device="meta")))
        ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
        out["text_encoder_prompt"] = count_flops(lambda: mods["text_encoder"](ids))
        px = torch.randn(1, 3, 224, 224, device="meta")
        out["clip_vit_l14_image"] = count_flops(lambda: mods["clip_vision"](pixel_values=px))
    v = value_correction(resolution)
    x = torch.randn(1, 4, f, f, device="meta")
    with torch.no_grad():
        out["value_forward"] = count_flops(lambda: v(torch.zeros(1, device="meta"), x))
    out["value_train"] = count_flops(lambda: v(torch.zeros(1, device="meta"), x).sum().backward())
    out["linear_in_rows"] = out["unet_forward_2_rows"] == 2 * out["unet_forward"]
    return out


# ------------------------------------------------------------------------------------------------------------------
# calls per image: the engine's code on the tiny pipeline, with hooks
# ------------------------------------------------------------------------------------------------------------------
class _CountingReward:
    def __init__(self, reward, counts: Counter):
        self.reward, self.counts = reward, counts
        self.name, self.differentiable = reward.name, reward.differentiable

    def __call__(self, images, prompts=None):
        self.counts["reward_images"] += images.shape[0]
        return self.reward(images, prompts)


def engine_calls(algo: str, K: int | None = None, n: int = 2) -> dict:
    """Rows per image of each network call made by one iteration of ``algo`` (rollout + update) with the ``full``
    profile's settings (K steps, guidance, micro-batches), measured on the tiny random pipeline.

    Keys: ``unet_policy`` (no gradient, adapter on: sampling), ``unet_pretrained`` (adapter off: the pretrained score
    of the KL and of the value's Tweedie denoiser), ``unet_train`` (with gradients: each row is also
    back-propagated), ``vae_decode``, ``reward_images``, ``value_forward`` / ``value_train`` (states), and the
    forward passes of the text encoder (prompts are cached, so it runs once per new prompt)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..dynamics.transition import Transition
    from ..engine.algos import make_algorithm
    from ..envs.sd.env import SDEnv
    from ..envs.sd.policy import LoRAScorePolicy
    from ..envs.sd.prompts import PromptSampler
    from ..envs.sd.rewards import JpegCompressibility
    from ..envs.sd.tiny import build_tiny_pipeline
    from ..runs import make_config
    from ..theory.control import rollout

    base = paper_config(algo)
    K = int(K or base.K)
    steps = max(1, round(base.batch * base.K / base.minibatch)) if base.minibatch else 1   # optimiser steps
    cfg = make_config(SD_PRESET, algo, "full", 0, {"K": K, "batch": n, "minibatch": max(1, n * K // steps),
                                                 "value_minibatch": max(1, base.value_minibatch * n // base.batch)})
    cfg = cfg.replace(beta=0.0)
    opt = cfg.options
    counts: Counter = Counter()
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(prediction_type="epsilon")
    env = SDEnv(pipe, _CountingReward(JpegCompressibility(), counts), PromptSampler.named(opt["prompts"]),
                guidance=float(opt["guidance"]), resolution=32, dtype=torch.float32,
                decode_batch=int(opt["decode_batch"]))
    policy = LoRAScorePolicy(env, rank=int(opt["lora_rank"]), target_modules=str(opt["lora_targets"]).split(","))
    lora_layer = next(m for m in env.unet.modules() if isinstance(m, BaseTunerLayer))

    def on_unet(mod, args, kwargs, output):
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        kind = "unet_train" if torch.is_grad_enabled() else (
            "unet_pretrained" if lora_layer.disable_adapters else "unet_policy")
        counts[kind] += rows

    hooks = [env.unet.register_forward_hook(on_unet, with_kwargs=True),
             env.vae.decoder.register_forward_hook(lambda m, a, o: counts.update(vae_decode=a[0].shape[0])),
             env.text_encoder.register_forward_hook(
                 lambda m, a, o: counts.update(text_encoder_prompts=o[0].shape[0]))]
    alg = make_algorithm(algo, env, policy, cfg, Transition(env.sde, cfg.method, cfg.eta))
    if alg.value is not None:
        corr = alg.value.correction
        hooks.append(corr.register_forward_hook(lambda m, a, o: counts.update(
            **{"value_train" if torch.is_grad_enabled() else "value_forward": o.shape[0]})))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # many tiny ops: extra threads only contend (see tests/conftest.py)
    try:
        batch = rollout(env, policy, env.time_grid(K), alg.transition, n, gen)
        alg.update(batch, gen)
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
    return {"K": K, "images": n, **{k: v / n for k, v in sorted(counts.items())}}


# ------------------------------------------------------------------------------------------------------------------
# the cost model
# ------------------------------------------------------------------------------------------------------------------
def trainer_overheads(algo: str) -> dict:
    """Per training image, the network rows of what the trainer adds in the ``full`` profile: an image grid per
    iteration (``grid_images`` decodes) and the robustness evaluation (``eval_n`` images at each of ``eval_steps``
    every ``eval_every`` iterations: rollouts with policy and pretrained score)."""
    cfg = paper_config(algo)
    opt = cfg.options
    steps = [int(k) for k in str(opt["eval_steps"]).split(",") if k]
    per_iter = 1.0 / cfg.batch
    every = int(opt["eval_every"])
    ev = int(opt["eval_n"]) * per_iter / every if every else 0.0
    return {"vae_decode": int(opt["grid_images"]) * per_iter if int(opt["image_every"]) else 0.0,
            "unet_policy": 2 * sum(steps) * ev, "unet_pretrained": 2 * sum(steps) * ev,
            "eval_decodes": len(steps) * ev}


def with_trainer_overheads(calls: dict, over: dict) -> dict:
    """Calls per image of an iteration plus the trainer's overheads (:func:`trainer_overheads`)."""
    out = dict(calls)
    for k in ("unet_policy", "unet_pretrained"):
        out[k] = calls.get(k, 0) + over[k]
    out["vae_decode"] = calls.get("vae_decode", 0) + over["vae_decode"] + over["eval_decodes"]
    return out


PHASES = ("sampling (policy, CFG)", "pretrained score (KL, Tweedie)", "VAE decodes", "value network",
          "training (LoRA fwd+bwd)")


def image_flops(calls: dict, flops: dict, checkpointing: bool) -> dict:
    """FLOPs per image by phase for the call counts ``calls`` (rows per image)."""
    train = flops["unet_train_checkpointed" if checkpointing else "unet_train"]
    phases = {
        PHASES[0]: calls.get("unet_policy", 0) * flops["unet_forward"],
        PHASES[1]: calls.get("unet_pretrained", 0) * flops["unet_forward"],
        PHASES[2]: calls.get("vae_decode", 0) * flops["vae_decode"],
        PHASES[3]: calls.get("value_forward", 0) * flops["value_forward"]
        + calls.get("value_train", 0) * flops["value_train"],
        PHASES[4]: calls.get("unet_train", 0) * train,
    }
    return phases | {"total": sum(phases.values())}


def ddpo_reference_calls(K: int) -> dict:
    """DDPO's reference code at beta = 0 (config/dgx.py): 2K guided rows to sample, no pretrained score, one decode and
    reward per image, a guided LoRA training pass per stored step (train.cfg, timestep_fraction 1)."""
    return {"unet_policy": 2 * K, "unet_train": 2 * K, "vae_decode": 1, "reward_images": 1}


def jpeg_reward_ms(resolution: int = RESOLUTION, n: int = 4) -> dict:
    """CPU milliseconds per image of the JPEG-compressibility reward (PIL, quality 95) on a smooth image and on
    uniform noise (the two ends of JPEG's cost), measured here."""
    from ..envs.sd.rewards import jpeg_size_kb

    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, resolution)
    smooth = (ramp[None, None, :, None] * ramp[None, None, None, :]).expand(n, 3, -1, -1).contiguous()
    noise = torch.rand(n, 3, resolution, resolution, generator=g)
    out = {}
    for name, imgs in (("smooth", smooth), ("noise", noise)):
        jpeg_size_kb(imgs[:1])
        t0 = time.perf_counter()
        jpeg_size_kb(imgs)
        out[name] = (time.perf_counter() - t0) / n * 1e3
    return out


# ------------------------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------------------------
def _loss_like_training(out, x, guidance: float):
    """The policy step's arithmetic after the UNet (guided eps, a Gaussian log-density, a ratio-weighted loss):
    float32 tensors of the latents' size, as in env.guided_eps and the PPO loss."""
    eps = out.float()
    e_u, e_c = eps.chunk(2)
    g = e_u + guidance * (e_c - e_u)
    mean = 0.9 * x + 0.1 * g
    logp = -((x - mean) ** 2).sum((1, 2, 3))
    return -(torch.exp(logp - logp.detach()) * 1.0).mean()


def training_step_bytes(unet, micro_batch: int, checkpointing: bool, resolution: int, amp: torch.dtype | None,
                        guidance: float = 7.0, device: str = "meta") -> dict:
    """Bytes of tensors made by one training micro-step (guided UNet forward on 2 x micro_batch rows, loss,
    backward into the LoRA gradients): ``after_forward`` (mostly what autograd keeps for the backward pass) and
    ``peak``. The weights and the stored rollout are not included (they exist before the step)."""
    emulate = (lambda: CudaAutocastEmulation(amp)) if amp is not None else (lambda: CudaAutocastEmulation(None))
    if checkpointing:
        unet.enable_gradient_checkpointing(checkpointing_under(emulate))
    else:
        unet.disable_gradient_checkpointing()
    x, _, _ = unet_inputs(micro_batch, resolution, device=device)
    t = torch.full((2 * micro_batch,), 500.0, device=device)
    emb = torch.randn(2 * micro_batch, 77, 768, device=device)
    wdtype = unet.dtype
    try:
        with LiveTensorBytes() as live, emulate():
            out = unet(torch.cat([x, x]).to(wdtype), t, encoder_hidden_states=emb.to(wdtype)).sample
            after_forward = live.current
            loss = _loss_like_training(out, x, guidance)
            del out
            loss.backward()
            del loss
            end = live.current
    finally:
        unet.disable_gradient_checkpointing()
        for p in unet.parameters():
            p.grad = None
    return {"after_forward": after_forward, "peak": live.peak, "end": end}


def inference_bytes(fn, amp: torch.dtype | None) -> int:
    """Peak bytes of the tensors made by fn() without gradients."""
    with torch.no_grad(), LiveTensorBytes() as live, CudaAutocastEmulation(amp):
        fn()
    return live.peak


def rollout_bytes_per_image(K: int, resolution: int) -> int:
    """What a :class:`~sacode.theory.control.Rollout` stores per image in float32: states x_0..x_K, pretrained means
    and scores at K steps (latent-sized), and log-probabilities, stds, KLs and log-ratios (K numbers each)."""
    d = 4 * (resolution // 8) ** 2
    return 4 * ((K + 1) * d + 2 * K * d + 4 * K)


def memory_report(resolution: int = RESOLUTION, amp: torch.dtype = torch.bfloat16) -> dict:
    """Memory of the ``full`` profile's phases on one GPU (bytes): resident state plus each phase's transient."""
    from ..envs.sd.sd15 import parameter_counts

    cfg = {a: paper_config(a) for a in ("ctpo", "ddpo")}
    opt = cfg["ctpo"].options
    n, K = cfg["ctpo"].batch, cfg["ctpo"].K
    mods = meta_modules(amp)
    unet = mods["unet"]
    params = parameter_counts({k: mods[k] for k in ("unet", "vae", "text_encoder")})
    lora = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    params["unet"] -= lora
    frozen = sum(params.values()) * torch.finfo(amp).bits // 8
    value_params = sum(p.numel() for p in value_correction(resolution).parameters())
    lora_state = 16 * lora                         # float32 parameters, gradients and AdamW's two moments
    value_state = 16 * value_params                # float32 parameters, gradients and Adam's two moments
    rollout = rollout_bytes_per_image(K, resolution) * n
    train = {f"micro{m}{'_ckpt' if ck else ''}": training_step_bytes(unet, m, ck, resolution, amp)
             for m in MICRO_BATCHES for ck in (False, True)}
    f = resolution // 8
    x, t, e = unet_inputs(2 * n, resolution, dtype=amp)
    sampling = inference_bytes(lambda: unet(x, t, encoder_hidden_states=e), amp)
    db = int(opt["decode_batch"])
    decode = inference_bytes(lambda: mods["vae"].decode(torch.randn(db, 4, f, f, device="meta", dtype=amp)), amp)
    # ctpo's structured value decodes x0_hat at every stored state: a float32 tensor of all K n denoised latents
    skip_x0 = 4 * K * n * 4 * f * f
    resident = {"ddpo": frozen + lora_state + rollout, "ctpo": frozen + lora_state + value_state + rollout}
    mb = int(cfg["ctpo"].micro_batch)
    phases = {}
    for algo in ("ctpo", "ddpo"):
        extra = skip_x0 if algo == "ctpo" else 0
        phases[algo] = {"sampling": resident[algo] + sampling, "decode": resident[algo] + extra + decode,
                        "training": resident[algo] + train[f"micro{mb}"]["peak"],
                        "training_ckpt": resident[algo] + train[f"micro{mb}_ckpt"]["peak"]}
    return {"amp": str(amp).replace("torch.", ""), "resolution": resolution, "rollout_batch": n, "K": K,
            "decode_batch": db, "micro_batch": mb, "parameters": params | {"lora": lora, "value": value_params},
            "frozen_weights": frozen, "lora_and_adamw": lora_state, "value_and_adam": value_state,
            "rollout_storage": rollout, "rollout_storage_per_image": rollout // n, "ctpo_x0_hat": skip_x0,
            "training_step": train, "sampling_unet_transient": sampling, "decode_transient": decode,
            "phase_peaks": phases}


def meta_equals_cpu(resolution: int = 32) -> dict:
    """The memory counter on meta and on real CPU tensors for the tiny UNet (bf16 emulation, with and without
    gradient checkpointing): the bytes must be equal (then meta loses nothing but time)."""
    from ..envs.sd.tiny import build_tiny_pipeline

    out = {}
    for device in ("cpu", "meta"):
        pipe = build_tiny_pipeline()
        unet = pipe.unet.to(device)
        torch.nn.Module.to(unet, dtype=torch.bfloat16)
        add_lora(unet, 4, ("to_q", "to_k", "to_v", "to_out.0"))
        for ck in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = _tiny_step(unet, ck, device)
            out[f"{device}{'_ckpt' if ck else ''}"] = r
    out["equal"] = all(out[f"cpu{s}"] == out[f"meta{s}"] for s in ("", "_ckpt"))
    return out


def _tiny_step(unet, ck: bool, device: str) -> dict:
    if ck:
        unet.enable_gradient_checkpointing(checkpointing_under(lambda: CudaAutocastEmulation(torch.bfloat16)))
    else:
        unet.disable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g).to(device)
    emb = torch.randn(2, 16, 32, generator=g).to(device)
    t = torch.full((2,), 500.0, device=device)
    with LiveTensorBytes() as live, CudaAutocastEmulation(torch.bfloat16):
        out = unet(torch.cat([x, x]).to(torch.bfloat16), t, encoder_hidden_states=emb.to(torch.bfloat16)).sample
        after = live.current
        loss = _loss_like_training(out, x, 7.0)
        del out
        loss.backward()
    for p in unet.parameters():
        p.grad = None
    return {"after_forward": after, "peak": live.peak}


# ------------------------------------------------------------------------------------------------------------------
# time model
# ------------------------------------------------------------------------------------------------------------------
def gpu_time_model(epoch_flops: dict, ddpo_reference_image_flops: float, measured: dict | None) -> dict:
    """Hours of the paper's runs (EPOCHS epochs on GPUS GPUs) = FLOPs / achieved FLOP/s, for each stated source of
    the achieved rate."""
    ref = DDPO_REFERENCE
    s_per_image = ref["hours"] * 3600 * ref["gpus"] / (ref["epochs"] * ref["images_per_epoch"])
    a100 = peak_bf16_tflops("A100")
    rate = ddpo_reference_image_flops / s_per_image / 1e12
    sources = {"ddpo-wallclock": {"fraction_of_peak": rate / a100,
                                  "how": f"DDPO's ~{ref['hours']:g} h for {ref['epochs']} epochs x "
                                         f"{ref['images_per_epoch']} images on {ref['gpus']} A100s "
                                         f"({s_per_image:.2f} A100-s per image) into our count of its FLOPs: "
                                         f"{rate:.0f} TFLOP/s end to end",
                                  "a100_tflops": rate},
               "target-40%": {"fraction_of_peak": TARGET_FRACTION,
                              "how": "40 % of peak, the target set for sampling (not a measurement)"}}
    if measured:
        sources["measured"] = measured
    gpus = {"A100": peak_bf16_tflops("A100"), "H100": peak_bf16_tflops("H100 SXM")}
    rows = {}
    for src, s in sources.items():
        for gpu, peak in gpus.items():
            rate_g = s["fraction_of_peak"] * peak * 1e12
            for key, flops in epoch_flops.items():
                rows[f"{src}|{gpu}|{key}"] = EPOCHS * flops / (GPUS * rate_g) / 3600
    return {"sources": sources, "hours": rows, "gpus": GPUS, "epochs": EPOCHS}


def measured_rate(path: Path) -> dict | None:
    """The achieved fraction of peak of a GPU run of ``bench sd-throughput`` (figures/bench-sd-throughput.json), if
    one has been recorded."""
    if not path.exists():
        return None
    res = json.loads(path.read_text()).get("results", {})
    frac = res.get("train_fraction_of_peak")
    if frac is None:
        return None
    return {"fraction_of_peak": frac, "how": f"measured by bench sd-throughput on {res.get('device')} (ddpo, bf16, "
                                            f"a whole iteration), applied as a fraction of each GPU's peak"}


# ------------------------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------------------------
def sd_cost(profile: str = "class", seeds: int = 1, presets=None, algos=None, cache: Path | None = None,
            out: Path | None = None) -> dict:
    out = Path(out or "figures")
    t0 = time.perf_counter()
    flops = component_flops(RESOLUTION)
    t_flops = time.perf_counter() - t0
    calls = {a: engine_calls(a) for a in ("ctpo", "ddpo")}
    K = calls["ctpo"]["K"]
    for a in ("ctpo", "ddpo"):
        calls[a + "+trainer"] = with_trainer_overheads(calls[a], trainer_overheads(a))
    calls["ddpo-reference"] = ddpo_reference_calls(K)
    per_image = {}
    for name in ("ddpo-reference", "ddpo", "ctpo"):
        for ck in (False, True):
            per_image[name + ("+ckpt" if ck else "")] = image_flops(calls[name], flops, ck)
    for name in ("ddpo+trainer", "ctpo+trainer"):
        per_image[name] = image_flops(calls[name], flops, False)
    epoch = {f"{a}{s}": per_image[f"{a}{s}"]["total"] * IMAGES_PER_EPOCH[a] for a in ("ctpo", "ddpo")
             for s in ("", "+ckpt")}
    ratio_equal_samples = per_image["ctpo"]["total"] / per_image["ddpo"]["total"]
    # where ctpo's extra cost sits: the structured value's r(D(x0_hat)) decodes every state (K of its K + 1 decodes)
    skip_decodes = (calls["ctpo"].get("vae_decode", 0) - calls["ddpo"].get("vae_decode", 0)) * flops["vae_decode"]
    ratio_without_skip = (per_image["ctpo"]["total"] - skip_decodes) / per_image["ddpo"]["total"]
    ratio_epoch = epoch["ctpo"] / epoch["ddpo"]
    jpeg = jpeg_reward_ms()
    t1 = time.perf_counter()
    mem = memory_report(RESOLUTION, torch.bfloat16)
    check = meta_equals_cpu()
    t_mem = time.perf_counter() - t1
    model = gpu_time_model(epoch, per_image["ddpo-reference"]["total"], measured_rate(out / "bench-sd-throughput.json"))
    results = {"resolution": RESOLUTION, "K": K, "guidance": float(paper_config("ctpo").options["guidance"]),
               "images_per_epoch": IMAGES_PER_EPOCH, "flops_per_call": flops, "calls_per_image": calls,
               "flops_per_image": per_image, "flops_per_epoch": epoch,
               "ctpo_over_ddpo_equal_samples": ratio_equal_samples, "ctpo_over_ddpo_per_epoch": ratio_epoch,
               "ctpo_value_decodes_per_image": skip_decodes,
               "ctpo_over_ddpo_equal_samples_without_value_decodes": ratio_without_skip,
               "jpeg_reward_ms_per_image": jpeg, "memory": mem, "memory_meta_equals_cpu": check,
               "gpu_time_model": model, "seconds": {"flops": t_flops, "memory": t_mem}}
    table = cost_table(results)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "sd-cost.png")
    return {"profile": profile, "results": results, "table": table, "output": "sd-cost.json"}


def _tf(v: float) -> str:
    return f"{v / 1e12:8.1f}"


def cost_table(r: dict) -> str:
    f, mem = r["flops_per_call"], r["memory"]
    pi = r["flops_per_image"]
    lines = [f"sd-cost: SD v1.5 at {r['resolution']} px, {r['K']} DDIM steps, guidance {r['guidance']:g}, LoRA; "
             f"FLOPs counted on meta tensors (no weights, no GPU)",
             "",
             "FLOPs per call (TFLOP)",
             f"  UNet forward, one row          {_tf(f['unet_forward'])}   (a guided step = 2 rows)",
             f"  UNet LoRA forward+backward     {_tf(f['unet_train'])}   checkpointed {_tf(f['unet_train_checkpointed'])}",
             f"  VAE decode, one image          {_tf(f['vae_decode'])}",
             f"  text encoder, one prompt       {f['text_encoder_prompt'] / 1e9:8.1f} GFLOP (cached per prompt)",
             f"  CLIP ViT-L/14 (aesthetic)      {f['clip_vit_l14_image'] / 1e9:8.1f} GFLOP per image",
             f"  value net V_phi fwd / fwd+bwd  {f['value_forward'] / 1e9:8.3f} / {f['value_train'] / 1e9:.3f} "
             f"GFLOP per state",
             "",
             "TFLOP per image by phase         " + "".join(f"{k:>12}" for k in ("ddpo-ref", "ddpo", "ctpo", "ctpo+ckpt"))]
    for ph in PHASES + ("total",):
        lines.append(f"  {ph:<31}" + "".join(f"{pi[k][ph] / 1e12:12.1f}"
                                            for k in ("ddpo-reference", "ddpo", "ctpo", "ctpo+ckpt")))
    c = r["calls_per_image"]
    lines += [f"  (rows per image: ctpo policy {c['ctpo'].get('unet_policy', 0):g}, pretrained "
              f"{c['ctpo'].get('unet_pretrained', 0):g}, train {c['ctpo'].get('unet_train', 0):g}, decodes "
              f"{c['ctpo'].get('vae_decode', 0):g}; ddpo decodes {c['ddpo'].get('vae_decode', 0):g})",
              f"  with the trainer's image grids and evaluations: ddpo {pi['ddpo+trainer']['total'] / 1e12:.1f}, "
              f"ctpo {pi['ctpo+trainer']['total'] / 1e12:.1f}",
              "",
              f"per epoch (ctpo {r['images_per_epoch']['ctpo']} images, ddpo {r['images_per_epoch']['ddpo']}): "
              f"ctpo {r['flops_per_epoch']['ctpo'] / 1e15:.0f} PFLOP, ddpo {r['flops_per_epoch']['ddpo'] / 1e15:.0f} "
              f"PFLOP; ratio {r['ctpo_over_ddpo_per_epoch']:.2f}; at equal samples "
              f"{r['ctpo_over_ddpo_equal_samples']:.2f} (target <= 1.1); the structured value's decodes of "
              f"x0_hat at every state are {r['ctpo_value_decodes_per_image'] / 1e12:.0f} TFLOP per image; "
              f"without them {r['ctpo_over_ddpo_equal_samples_without_value_decodes']:.2f}",
              f"JPEG reward on the CPU: {r['jpeg_reward_ms_per_image']['smooth']:.1f} ms (smooth) to "
              f"{r['jpeg_reward_ms_per_image']['noise']:.1f} ms (noise) per 512 px image; ctpo rewards "
              f"{c['ctpo'].get('reward_images', 0):g} images per sample, ddpo {c['ddpo'].get('reward_images', 0):g}",
              "",
              f"memory on one GPU ({mem['amp']} weights and autocast, flash attention; GiB)",
              f"  frozen weights {mem['frozen_weights'] / GiB:.2f}; LoRA + AdamW {mem['lora_and_adamw'] / GiB:.3f}; "
              f"value net + Adam {mem['value_and_adam'] / GiB:.3f}; rollout of {mem['rollout_batch']} images "
              f"{mem['rollout_storage'] / GiB:.2f}",
              "  training micro-step (guided: 2 rows per transition)   after forward / peak"]
    for m in MICRO_BATCHES:
        a, b = mem["training_step"][f"micro{m}"], mem["training_step"][f"micro{m}_ckpt"]
        lines.append(f"    micro-batch {m}: {a['after_forward'] / GiB:6.2f} / {a['peak'] / GiB:6.2f}   "
                     f"checkpointed {b['after_forward'] / GiB:6.2f} / {b['peak'] / GiB:6.2f}")
    lines += [f"  sampling: UNet on {2 * mem['rollout_batch']} rows {mem['sampling_unet_transient'] / GiB:.2f}; "
              f"VAE decode of {mem['decode_batch']} images {mem['decode_transient'] / GiB:.2f}",
              "  phase peaks (resident + transient):"]
    for algo, ph in mem["phase_peaks"].items():
        lines.append(f"    {algo}: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in ph.items()))
    chk = r["memory_meta_equals_cpu"]
    lines.append(f"  counter on meta == on CPU tensors (tiny UNet, bf16 emulation, +-checkpointing): {chk['equal']}")
    tm = r["gpu_time_model"]
    lines += ["", f"GPU-time model: hours for {tm['epochs']} epochs on {tm['gpus']} GPUs = FLOPs / achieved rate"]
    for src, s in tm["sources"].items():
        lines.append(f"  [{src}] {s['fraction_of_peak'] * 100:.0f}% of peak: {s['how']}")
        for gpu in ("A100", "H100"):
            h = tm["hours"]
            lines.append(f"    4x{gpu}: ctpo {h[f'{src}|{gpu}|ctpo']:.1f} h ({h[f'{src}|{gpu}|ctpo+ckpt']:.1f} with "
                         f"checkpointing), ddpo {h[f'{src}|{gpu}|ddpo']:.1f} h")
    return fit_to_column("\n".join(lines))


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..plotting import COLUMN_INCHES

    fig, ax = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 8.0), layout="constrained")
    names = ("ddpo-reference", "ddpo", "ctpo", "ctpo+ckpt")
    shades = plt.get_cmap("Set2").colors[:len(PHASES)]       # phases, not methods: no book-wide method colours
    bottom = [0.0] * len(names)
    for ph, col in zip(PHASES, shades):
        vals = [r["flops_per_image"][n][ph] / 1e12 for n in names]
        ax[0].bar(names, vals, bottom=bottom, color=col, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax[0].set(ylabel="TFLOP per image", title=f"FLOPs per image ({r['resolution']} px, K = {r['K']})")
    ax[0].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    mem = r["memory"]
    labels, act, ck = [], [], []
    for m in MICRO_BATCHES:
        labels.append(f"micro-batch {m}")
        act.append(mem["training_step"][f"micro{m}"]["peak"] / GiB)
        ck.append(mem["training_step"][f"micro{m}_ckpt"]["peak"] / GiB)
    xs = range(len(labels))
    ax[1].bar([x - 0.2 for x in xs], act, 0.4, color="#555555", label="no checkpointing")
    ax[1].bar([x + 0.2 for x in xs], ck, 0.4, color="#aaaaaa", label="gradient checkpointing")
    ax[1].set_xticks(list(xs), labels)
    ax[1].set(ylabel="GiB (beyond the weights)", title="training micro-step: peak of its tensors (bf16)")
    ax[1].legend(fontsize=9, loc="upper left")
    ax[1].set_ylim(0, max(act) * 1.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)

