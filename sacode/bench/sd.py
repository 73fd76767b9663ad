"""``python -m sacode bench sd-throughput``: the measured cost of the Stable Diffusion v1.5 run on this GPU.

Builds SD v1.5's exact architecture with *random* weights (``model=sd15-random``, :mod:`sacode.envs.sd.sd15`;
nothing is downloaded, and cost does not depend on the weights' values), adds the run's LoRA adapter, and measures
for bf16 and fp16 autocast, gradient checkpointing off and on, ``ctpo`` and ``ddpo``:

* sampling: images/s of K DDIM steps with classifier-free guidance (policy only, as inference), and the achieved
  fraction of the GPU's peak dense bf16 FLOP/s in it (UNet FLOPs counted by ``bench sd-cost``'s counter;
  the peak from :mod:`sacode.bench.gpus`, or a matmul microbenchmark for GPUs not in its table);
* one training iteration: the rollout (policy and pretrained score at every step, reward) and the algorithm's update
  (ctpo: value fit with r(D(x0_hat)) at every state, PPO pass; ddpo: PPO pass), in seconds per image, and the
  seconds of one paper epoch per GPU (ctpo 512 / 4, ddpo 256 / 4 images), extrapolated linearly from the measured
  batch; the achieved fraction of peak over the iteration (all counted FLOPs / seconds);
* peak GPU memory of each phase next to the peak that ``bench sd-cost``'s tensor count predicts for it;
* the ctpo / ddpo epoch-time ratio at equal samples (target <= 1.1) and per paper epoch.

Profiles: ``class`` (512 px, 50 steps, 8 images; what ``scripts/gpu-check.sh`` runs, minutes on an H100),
``full`` (16 images), ``ci`` (256 px, 4 steps, 2 images: the gpu test), and ``smoke`` (64 px, 1 step, 1 image,
float32): the same code on a CPU, for a test; its numbers say nothing about a GPU. Other profiles need CUDA.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

SETTINGS = {
    "smoke": dict(resolution=64, K=1, batch=2, micro_batch=1, amps=("no",)),
    "ci": dict(resolution=256, K=4, batch=2, micro_batch=2, amps=("bf16",)),
    "class": dict(resolution=512, K=50, batch=8, micro_batch=4, amps=("bf16", "fp16")),
    "full": dict(resolution=512, K=50, batch=16, micro_batch=4, amps=("bf16", "fp16")),
}
CTPO_DDPO_TARGET = 1.1
DECODE_BATCH = 8                  # latents decoded per VAE call in this benchmark
SAMPLING_TARGET = 0.40


def require_cuda(profile: str) -> None:
    if profile != "smoke" and not torch.cuda.is_available():
        raise SystemExit("sd-throughput measures GPU throughput and needs CUDA (torch.cuda.is_available() is False "
                         "here). Run it on a machine with an NVIDIA GPU: python -m sacode bench sd-throughput; on a "
                         "CPU only the code path can be checked: --profile smoke")


def _timed_cuda(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def _timed_cpu(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, float("nan")


def measure(env, policy, K: int, n: int, algos: list[str], timed=_timed_cuda, checkpointing=(False,),
            micro_batch: int = 4) -> dict:
    """Sampling throughput (policy only), the training rollout (policy and pretrained score, reward), and one update
    of each algorithm with the sd15 ``full`` settings (micro-batches of ``micro_batch`` transitions), with gradient
    checkpointing off and/or on, on ``env`` (any device; ``timed`` measures seconds and peak memory)."""
    from ..dynamics.samplers import reverse_sde_sample
    from ..dynamics.transition import Transition
    from ..engine.algos import make_algorithm
    from ..runs import make_config
    from ..theory.control import rollout

    rows: dict = {}
    grid = env.time_grid(K)
    stepper = Transition(env.sde, "ddim", 1.0)
    gen = torch.Generator(device=env.device).manual_seed(0)         # noise drawn where the latents live
    prompts = env.sample_conditions(n, gen)
    with torch.no_grad():
        rollout(env, policy, env.time_grid(1), stepper, n, gen)                          # warm-up
        _, t, mem = timed(lambda: reverse_sde_sample(env.sde, policy.score_fn(prompts), env.sample_init(n, gen), grid,
                                                     "ddim", 1.0, gen))
    rows["sample_s"], rows["sample_images_per_s"], rows["sample_peak_GiB"] = t, n / t, mem
    batch, t, mem = timed(lambda: rollout(env, policy, grid, stepper, n, gen))
    rows["rollout_s"], rows["rollout_images_per_s"], rows["rollout_peak_GiB"] = t, n / t, mem
    for algo in algos:
        for ck in checkpointing:
            if ck:
                policy.unet.enable_gradient_checkpointing()
            else:
                policy.unet.disable_gradient_checkpointing()
            key = f"{algo}{'_ckpt' if ck else ''}"
            cfg = make_config("sd15-compressibility", algo, "full", 0,
                              {"K": K, "batch": n, "minibatch": n * K, "micro_batch": micro_batch,
                               "value_minibatch": 4 * n}).replace(beta=0.0)
            alg = make_algorithm(algo, env, policy, cfg, stepper)
            _, t, mem = timed(lambda: alg.update(batch, torch.Generator().manual_seed(1)))
            rows[f"{key}_update_s"], rows[f"{key}_update_peak_GiB"] = t, mem
            rows[f"{key}_s_per_transition"] = t / (n * K)
            del alg
    policy.unet.disable_gradient_checkpointing()
    return rows


def predicted_peaks(resolution: int, n: int, K: int, micro_batch: int, algos, amp: str) -> dict:
    """The peak memory (GiB) of each measured phase predicted by ``bench sd-cost``'s tensor count on meta (weights,
    LoRA and optimiser state, the stored rollout of n images, and the phase's tensors)."""
    from .memory import GiB
    from .sd_cost import (add_lora, inference_bytes, rollout_bytes_per_image, training_step_bytes,
                          unet_inputs, value_correction)
    from ..envs.sd.sd15 import sd15_modules

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[amp]
    mods = sd15_modules("meta", dtype)
    add_lora(mods["unet"], 4, ("to_q", "to_k", "to_v", "to_out.0"))
    weights = sum(p.numel() * p.element_size() for m in mods.values() for p in m.parameters())
    lora = sum(p.numel() for nme, p in mods["unet"].named_parameters() if "lora_" in nme)
    value = sum(p.numel() for p in value_correction(resolution).parameters())
    low = None if amp == "no" else dtype
    x, t, e = unet_inputs(2 * n, resolution, dtype=dtype)
    sampling = inference_bytes(lambda: mods["unet"](x, t, encoder_hidden_states=e), low)
    f = resolution // 8
    decode = inference_bytes(lambda: mods["vae"].decode(torch.randn(min(n, DECODE_BATCH), 4, f, f, device="meta",
                                                                    dtype=dtype)), low)
    stored = rollout_bytes_per_image(K, resolution) * n
    x0_all = 4 * K * n * 4 * f * f              # ctpo's r(D(x0_hat)) at every state: all denoised latents at once
    out = {"sample": (weights + sampling) / GiB, "rollout": (weights + stored + max(sampling, decode)) / GiB}
    for ck in (False, True):
        step = training_step_bytes(mods["unet"], micro_batch, ck, resolution, low)["peak"]
        for algo in algos:
            # LoRA gradients and Adam moments (its parameters are in ``weights``); ctpo's value net with its state
            state = 12 * lora + (16 * value if algo == "ctpo" else 0)
            transient = max(step, x0_all + decode) if algo == "ctpo" else step
            out[f"{algo}{'_ckpt' if ck else ''}_update"] = (weights + stored + state + transient) / GiB
    return out


def sd_throughput(profile: str = "class", seeds: int = 1, presets=None, algos=None, cache: Path | None = None,
                  out: Path | None = None, model: str = "sd15-random") -> dict:
    """The benchmark (see the module). ``model="tiny"`` times the tiny pipeline instead (a fast test of the code
    path; its FLOP and memory columns still count SD v1.5)."""
    require_cuda(profile)
    from ..envs.sd.env import SDEnv
    from ..envs.sd.policy import LoRAScorePolicy
    from ..envs.sd.prompts import PromptSampler
    from ..envs.sd.rewards import JpegCompressibility
    from ..envs.sd.sd15 import build_sd15_random
    from .gpus import gpu_peak
    from .sd_cost import GPUS, IMAGES_PER_EPOCH, component_flops, engine_calls, image_flops

    st = SETTINGS[profile]
    cuda = torch.cuda.is_available() and profile != "smoke"
    device = "cuda" if cuda else "cpu"
    timed = _timed_cuda if cuda else _timed_cpu
    algos = algos or ["ctpo", "ddpo"]
    n, K, res, mb = st["batch"], st["K"], st["resolution"], st["micro_batch"]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        peak = gpu_peak(torch.cuda.get_device_name())
    else:
        peak = {"device": "cpu (smoke: the code path only)", "peak_bf16_tflops": None, "peak_source": None}
    flops = component_flops(res)
    calls = {a: engine_calls(a, K) for a in algos}
    head = {"device": peak["device"], "model": model, "resolution": res, "K": K, "batch": n, "micro_batch": mb, "lora_rank": 4,
            "peak": peak, "flops_per_call": flops, "calls_per_image": calls,
            "images_per_gpu_epoch": {a: IMAGES_PER_EPOCH[a] // GPUS for a in algos}}
    runs, predicted = [], {}
    for amp in st["amps"]:
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[amp]
        if model == "tiny":
            from ..envs.sd.task import load_pipeline
            pipe = load_pipeline("tiny", torch_dtype=weight_dtype, device=device)
        else:
            pipe = build_sd15_random(device, weight_dtype, warn=False)
        head["unet_params_M"] = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
        env = SDEnv(pipe, JpegCompressibility(), PromptSampler.named("animals"), guidance=7.0, resolution=res,
                    device=device, dtype=torch.float32, amp=amp, decode_batch=DECODE_BATCH)
        policy = LoRAScorePolicy(env, rank=4)
        r = measure(env, policy, K, n, algos, timed, checkpointing=(False, True), micro_batch=mb)
        half = "bf16" if amp in ("bf16", "fp16") else amp       # fp16 and bf16 tensors have the same sizes
        if half not in predicted:
            predicted[half] = predicted_peaks(res, n, K, mb, algos, half)
        pred = predicted[half]
        tflops = peak["peak_bf16_tflops"]
        sample_flops = n * 2 * K * flops["unet_forward"]
        run = {"amp": amp, "sample_images_per_s": r["sample_images_per_s"],
               "sample_fraction_of_peak": sample_flops / r["sample_s"] / (tflops * 1e12) if tflops else None,
               "rollout_s_per_image": r["rollout_s"] / n, "sample_peak_GiB": r["sample_peak_GiB"],
               "rollout_peak_GiB": r["rollout_peak_GiB"], "predicted_GiB": pred, "algos": {}}
        for algo in algos:
            for ck in (False, True):
                key = f"{algo}{'_ckpt' if ck else ''}"
                s_img = (r["rollout_s"] + r[f"{key}_update_s"]) / n
                f_img = image_flops(calls[algo], flops, ck)["total"]
                run["algos"][key] = {
                    "update_s_per_image": r[f"{key}_update_s"] / n, "s_per_image": s_img,
                    "epoch_s": s_img * IMAGES_PER_EPOCH[algo] / GPUS,
                    "fraction_of_peak": f_img / s_img / (tflops * 1e12) if tflops else None,
                    "peak_GiB": max(r["rollout_peak_GiB"], r[f"{key}_update_peak_GiB"]),
                    "update_peak_GiB": r[f"{key}_update_peak_GiB"], "predicted_update_GiB": pred[f"{key}_update"]}
        if "ctpo" in algos and "ddpo" in algos:
            for s in ("", "_ckpt"):
                a, b = run["algos"][f"ctpo{s}"], run["algos"][f"ddpo{s}"]
                run[f"ctpo_over_ddpo_equal_samples{s}"] = a["s_per_image"] / b["s_per_image"]
                run[f"ctpo_over_ddpo_per_epoch{s}"] = a["epoch_s"] / b["epoch_s"]
        runs.append(run)
        del policy, env, pipe
        if cuda:
            torch.cuda.empty_cache()
    results = head | {"runs": runs}
    bf16 = next((r for r in runs if r["amp"] == "bf16"), None)
    if bf16 is not None and "ddpo" in bf16["algos"]:
        results["train_fraction_of_peak"] = bf16["algos"]["ddpo"]["fraction_of_peak"]
        results["sample_fraction_of_peak"] = bf16["sample_fraction_of_peak"]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plot_throughput(results, Path(out) / "bench-sd-throughput.png")
    return {"profile": profile, "results": results, "table": throughput_table(results, profile)}


def plot_throughput(r: dict, path: Path) -> None:
    """Seconds per image of an iteration (rollout + update) and peak memory, measured and counted, per run."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..plotting import color

    from ..plotting import COLUMN_INCHES

    fig, ax = plt.subplots(2, 1, figsize=(COLUMN_INCHES, 8.0), layout="constrained")
    labels, secs, peaks, counted, cols = [], [], [], [], []
    for run in r["runs"]:
        for key, a in run["algos"].items():
            labels.append(f"{key}\n{run['amp']}")
            secs.append(a["s_per_image"])
            peaks.append(a["peak_GiB"])
            counted.append(max(a["predicted_update_GiB"], run["predicted_GiB"]["rollout"]))
            cols.append(color(key.split("_")[0]))
    xs = list(range(len(labels)))
    ax[0].bar(xs, secs, color=cols)
    ax[0].set(ylabel="seconds per image", title=f"one iteration per image ({r['device']}, {r['resolution']} px)")
    ax[1].bar([x - 0.2 for x in xs], peaks, 0.4, color=cols, label="measured peak")
    ax[1].bar([x + 0.2 for x in xs], counted, 0.4, color="#aaaaaa", label="counted (bench sd-cost's counter)")
    ax[1].set(ylabel="GiB", title="peak memory of the iteration")
    top = max([v for v in peaks + counted if not math.isnan(v)] or [1.0])
    ax[1].set_ylim(0, 1.35 * top)
    ax[1].legend(fontsize=9, loc="upper left")
    for a in ax:
        a.set_xticks(xs, labels, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}%"


def _gib(v) -> str:
    return "  n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.1f}"


def throughput_table(r: dict, profile: str) -> str:
    pk = r["peak"]
    lines = [f"sd-throughput on {r['device']} ({r['resolution']} px, {r['K']} DDIM steps, guidance 7, batch "
             f"{r['batch']}, micro-batch {r['micro_batch']}, LoRA rank 4, {r['model']} weights, "
             f"{r['unet_params_M']:.0f} M UNet parameters)"]
    if pk.get("peak_bf16_tflops"):
        lines.append(f"  peak dense bf16 {pk['peak_bf16_tflops']:.0f} TFLOP/s ({pk['peak_source']}); bf16 matmul "
                     f"measured {pk['matmul_bf16_tflops']:.0f} TFLOP/s")
    if profile == "smoke":
        lines.append("  smoke profile on a CPU: the code path only; these numbers say nothing about a GPU")
    for run in r["runs"]:
        pred = run["predicted_GiB"]
        lines += [f"  [{run['amp']}] sampling {run['sample_images_per_s']:.3f} images/s "
                  f"({_pct(run['sample_fraction_of_peak'])} of peak; target >= {SAMPLING_TARGET:.0%})  "
                  f"peak {_gib(run['sample_peak_GiB'])} GiB (counted {pred['sample']:.1f})",
                  f"         rollout {run['rollout_s_per_image']:.2f} s/image  peak {_gib(run['rollout_peak_GiB'])} GiB "
                  f"(counted {pred['rollout']:.1f})",
                  "         algorithm      update s/img  iteration s/img  epoch s/GPU  of peak  peak GiB (counted)"]
        for key, a in run["algos"].items():
            lines.append(f"         {key:<14} {a['update_s_per_image']:12.2f} {a['s_per_image']:16.2f} "
                         f"{a['epoch_s']:12.1f} {_pct(a['fraction_of_peak'])}  {_gib(a['update_peak_GiB'])} "
                         f"({a['predicted_update_GiB']:.1f})")
        for s, name in (("", "no checkpointing"), ("_ckpt", "checkpointing")):
            if f"ctpo_over_ddpo_equal_samples{s}" in run:
                v = run[f"ctpo_over_ddpo_equal_samples{s}"]
                verdict = ("no verdict on a CPU" if profile == "smoke"
                           else "met" if v <= CTPO_DDPO_TARGET else "NOT met")
                lines.append(f"         ctpo/ddpo time at equal samples ({name}): {v:.2f} (target <= "
                             f"{CTPO_DDPO_TARGET}: {verdict}); per paper epoch "
                             f"{run[f'ctpo_over_ddpo_per_epoch{s}']:.2f}")
    return "\n".join(lines)
