"""Run configuration: one dataclass, defaults by profile and algorithm, ``--set key=value`` overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    preset: str = "gauss1d-linear"
    algo: str = "ctpo"
    seed: int = 0
    profile: str = "class"
    # budget
    iterations: int = 60
    batch: int = 256                 # trajectories per iteration
    eval_batch: int = 4096           # trajectories for the final evaluation
    # sampler / time grid
    K: int = 20
    grid: str = "uniform"            # uniform | power | random (a fresh random grid per iteration)
    s_end: float | None = None       # last diffusion time of the grid; None: 0, or 1e-3 T for ddim (whose step
                                     # to s = 0 is deterministic, as in diffusers' DDIM with set_alpha_to_one=False)
    method: str = "em"               # em | ddim | pf-euler | pf-heun
    eta: float = 1.0
    explore: float = 0.0             # exploration noise for deterministic samplers (chapter 9)
    # objective
    beta: float | None = None        # KL weight; None = the preset's
    # optimisation
    lr: float = 3e-3
    value_lr: float = 3e-3
    clip: float = 0.2
    adv_clip: float = 5.0
    adv_norm: str = "center"         # none | center | global | step
    inner_epochs: int = 1
    minibatch: int = 1024            # transitions per minibatch
    step_fraction: float = 1.0       # fraction of transitions used per epoch (timestep subsampling)
    micro_batch: int = 0             # transitions per forward/backward pass; gradients accumulate over a minibatch
                                     # (0: the whole minibatch at once)
    value_minibatch: int = 0         # states per value-network step (0: minibatch)
    weight_decay: float = 0.0        # > 0: AdamW with this decoupled weight decay for the policy
    value_epochs: int = 2
    max_grad_norm: float = 1.0
    sum_steps: bool = True           # scale per-transition losses by K (a per-trajectory sum over steps)
    logprob_mean: bool = False       # DDPO's per-dimension mean log-density instead of the sum
    bp_steps: int = 0                # backprop: number of final steps the gradient flows through (0: all)
    bp_updates: int = 4              # backprop: gradient steps per iteration, each on batch/bp_updates fresh samples
    # networks
    value: str = "structured"        # structured | mlp
    hidden: int = 64
    depth: int = 2
    pretrained: str = "exact"        # exact | mlp (a DSM-trained score, sacode/checkpoints)
    # bookkeeping
    checkpoint_every: int = 10
    progress: bool = True
    # task-specific keys (a task's config_defaults may return {"options": {...}}); set with --set key=value too,
    # e.g. the Stable Diffusion model path (--set model=PATH)
    options: dict = field(default_factory=dict)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


PROFILE_BUDGETS = {
    "ci": dict(iterations=4, batch=64, eval_batch=512, checkpoint_every=2),
    "class": dict(iterations=60, batch=256, eval_batch=4096),
    "full": dict(iterations=300, batch=512, eval_batch=20000, checkpoint_every=25),
}

ALGO_DEFAULTS = {
    "ctpo": dict(lr=3e-3, clip=0.2, adv_norm="center"),
    "ctpo-pathwise": dict(lr=3e-3),
    "ddpo": dict(lr=3e-3, clip=0.2),
    "dpok": dict(lr=3e-3, clip=0.2, adv_norm="center"),
    "backprop": dict(lr=3e-3),
}


def make_config(preset: str, algo: str = "ctpo", profile: str = "class", seed: int = 0,
                overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the profile's budget, then the algorithm's tuned values, then the preset's own defaults
    (a task class may define ``config_defaults(profile, algo) -> dict``, e.g. image sizes), then the user's
    overrides."""
    if profile not in PROFILE_BUDGETS:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILE_BUDGETS)}")
    if algo not in ALGO_DEFAULTS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGO_DEFAULTS)}")
    cfg = TrainConfig(preset=preset, algo=algo, profile=profile, seed=seed)
    cfg = cfg.replace(**PROFILE_BUDGETS[profile]).replace(**ALGO_DEFAULTS[algo])
    cfg = apply_overrides(cfg, preset_defaults(preset, profile, algo))
    return apply_overrides(cfg, overrides or {})


def preset_defaults(preset: str, profile: str, algo: str) -> dict:
    """The preset's task-specific defaults (``config_defaults`` on its task class), or none."""
    from .tasks import TASKS

    fn = getattr(TASKS.get(preset), "config_defaults", None)
    return dict(fn(profile, algo)) if fn is not None else {}


def apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kw, options = {}, dict(cfg.options)
    for key, raw in overrides.items():
        if key == "options":
            options.update(raw)
        elif key in fields:
            kw[key] = _coerce(raw, getattr(cfg, key), key)
        elif key in options:
            options[key] = _coerce(raw, options[key], key)
        else:
            extra = f"; options of this preset: {', '.join(sorted(options))}" if options else ""
            raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}{extra}")
    return cfg.replace(**kw, options=options)


def _coerce(raw, current, key):
    if not isinstance(raw, str):
        return raw
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"{key} expects true/false; got {raw!r}")
    if raw.lower() == "none":
        return None
    try:
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float) or current is None:
            return float(raw)
    except ValueError as e:
        raise ValueError(f"{key} expects a number; got {raw!r}") from e
    return raw


def parse_sets(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set expects key=value; got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out
