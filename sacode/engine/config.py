"""Run configuration: one typed dataclass, one table of defaults per task, validated ``--set key=value`` overrides.

A run's configuration is resolved in one order, and every value remembers where it came from:

1. ``default``    the field defaults of :class:`TrainConfig` (and of the task's own options, :attr:`Task.options`);
2. ``task``       the task's :class:`ConfigTable` entry ``task`` (settings shared by all its runs);
3. ``preset``     the preset's own settings (its registry entry, e.g. the reward of a Stable Diffusion preset);
4. ``algorithm``  the table entry for the algorithm (e.g. its tuned learning rate);
5. ``profile``    the table entry for the profile (``ci``, ``class``, ``full``): run sizes;
6. ``profile + algorithm`` an entry ``(profile, algorithm)`` where both matter;
7. ``--set``      the user's overrides.

``python -m sacode train PRESET --algo A --show-config`` prints the result with the source of every value. Every
value is checked against its type and range (:class:`Param`) before anything is created, and an error names the key
and the accepted values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..profiles import PROFILES

ALGORITHMS = ("ctpo", "ctpo-pathwise", "ddpo", "dpok", "backprop")


@dataclass(frozen=True)
class Param:
    """A typed configuration value with its accepted range.

    ``kind`` is int, float, bool or str; ``optional`` allows None; ``ge``/``gt``/``le`` bound numbers; ``choices``
    lists the accepted strings.
    """

    default: Any
    kind: type
    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False

    def accepted(self) -> str:
        """The accepted values, in words (for error messages and --show-config)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        bounds = [f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
                  f"<= {self.le:g}" if self.le is not None else ""]
        out = name + "".join(" " + b for b in bounds if b)
        return out + (" or none" if self.optional else "")

    def coerce(self, key: str, raw: Any) -> Any:
        """``raw`` (a string from the command line, or a Python value) as a valid value of this parameter."""
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
            if self.optional:
                return None
            raise ValueError(f"{key} must be {self.accepted()}; got none")
        value = raw
        if isinstance(raw, str):
            text = raw.strip()
            try:
                if self.kind is bool:
                    if text.lower() in ("1", "true", "yes", "on"):
                        value = True
                    elif text.lower() in ("0", "false", "no", "off"):
                        value = False
                    else:
                        raise ValueError
                elif self.kind is int:
                    f = float(text)
                    if not f.is_integer():
                        raise ValueError
                    value = int(f)
                elif self.kind is float:
                    value = float(text)
                else:
                    value = text
            except ValueError:
                raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}") from None
        else:
            if self.kind is bool and not isinstance(raw, bool):
                raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
            if self.kind is int:
                if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer())):
                    raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
                value = int(raw)
            elif self.kind is float:
                if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                    raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
                value = float(raw)
            elif self.kind is str and not isinstance(raw, str):
                raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
        if self.kind in (int, float):
            if not math.isfinite(value):
                raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
            if (self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt) or \
                    (self.le is not None and value > self.le):
                raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{key} must be {self.accepted()}; got {raw!r}")
        return value


def param(default: Any, kind: type, help: str = "", **kw) -> Any:
    """A dataclass field carrying its :class:`Param` in the metadata."""
    return field(default=default, metadata={"param": Param(default, kind, help, **kw)})


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs besides its task (see the module docstring for how it is resolved)."""

    preset: str = param("gauss1d-linear", str, "preset name (python -m sacode train --list)")
    algo: str = param("ctpo", str, "fine-tuning algorithm", choices=ALGORITHMS)
    seed: int = param(0, int, "seed of the run", ge=0)
    profile: str = param("class", str, "run-size profile", choices=PROFILES)
    # budget
    iterations: int = param(60, int, "iterations (one batch of rollouts and one update each)", ge=1)
    batch: int = param(256, int, "trajectories per iteration", ge=1)
    eval_batch: int = param(4096, int, "trajectories of the final evaluation", ge=1)
    # sampler / time grid
    K: int = param(20, int, "sampler steps", ge=1)
    grid: str = param("uniform", str, "time grid (random: a fresh random grid per iteration; native: the "
                      "environment's own, e.g. a diffusers scheduler's)", choices=("uniform", "power", "random", "native"))
    s_end: float | None = param(None, float, "last diffusion time of the grid (none: 0, or 1e-3 T for ddim)", ge=0.0,
                                optional=True)
    method: str = param("em", str, "sampler", choices=("em", "ddim", "pf-euler", "pf-heun"))
    eta: float = param(1.0, float, "sampler noise (em, ddim)", ge=0.0)
    explore: float = param(0.0, float, "exploration noise of deterministic samplers (chapter 10)", ge=0.0)
    # objective
    beta: float | None = param(None, float, "KL weight (none: the preset's)", ge=0.0, optional=True)
    kl: str = param("chain", str, "per-step KL penalty: chain (the exact KL of the discrete chain) or girsanov (the "
                    "paper code's 1/2 ((1+eta^2)/(2 eta))^2 int g^2 ||s_theta - s_pre||^2; chapter 4)",
                    choices=("chain", "girsanov"))
    # optimisation
    lr: float = param(3e-3, float, "policy learning rate", gt=0.0)
    value_lr: float = param(3e-3, float, "value-network learning rate", gt=0.0)
    clip: float = param(0.2, float, "PPO clip range of the likelihood ratio", gt=0.0)
    adv_clip: float = param(5.0, float, "advantages are clamped to +- adv_clip (ddpo; ctpo and dpok when adv_norm is global or step)", gt=0.0)
    adv_norm: str = param("center", str, "advantage normalisation", choices=("none", "center", "global", "step"))
    inner_epochs: int = param(1, int, "PPO epochs per batch", ge=1)
    minibatch: int = param(1024, int, "transitions per optimiser step", ge=1)
    step_fraction: float = param(1.0, float, "fraction of transitions used per epoch", gt=0.0, le=1.0)
    micro_batch: int = param(0, int, "transitions per forward/backward pass (0: the whole minibatch)", ge=0)
    value_minibatch: int = param(0, int, "states per value-network step (0: minibatch)", ge=0)
    weight_decay: float = param(0.0, float, "AdamW decoupled weight decay of the policy (0: Adam)", ge=0.0)
    value_epochs: int = param(2, int, "value-regression epochs per batch", ge=0)
    max_grad_norm: float = param(1.0, float, "gradient-norm clipping threshold", gt=0.0)
    sum_steps: bool = param(True, bool, "scale per-transition losses by K (a per-trajectory sum over steps)")
    logprob_mean: bool = param(False, bool, "DDPO's per-dimension mean log-density instead of the sum")
    bp_steps: int = param(0, int, "backprop: final steps the gradient flows through (0: all)", ge=0)
    bp_updates: int = param(4, int, "backprop: gradient steps per iteration", ge=1)
    # networks
    value: str = param("structured", str, "value network", choices=("structured", "mlp"))
    hidden: int = param(64, int, "hidden width of the policy and value networks", ge=1)
    depth: int = param(2, int, "hidden layers of the policy and value networks", ge=1)
    pretrained: str = param("exact", str, "pretrained score of the toys: exact or a DSM-trained MLP",
                            choices=("exact", "mlp", "unet"))
    # value learning (chapter 7): how the value network is built and fitted. The defaults are the paper's structured
    # value fitted on the current batch's Monte-Carlo returns; sacode.engine.value explains each option.
    value_skip: str = param("cos", str, "structured value: weight of its Tweedie branch r(x0_hat) (cos: the paper's, "
                            "fading towards the noise end; one: constant)", choices=("cos", "one"))
    value_zero_init: bool = param(False, bool, "the value network's learned branch starts at zero")
    value_replay: int = param(1, int, "batches (the current one and earlier ones) each value fit regresses on", ge=1)
    value_lambda: float = param(1.0, float, "TD(lambda) value targets (1: Monte-Carlo returns)", ge=0.0, le=1.0)
    # bookkeeping
    checkpoint_every: int = param(10, int, "iterations between checkpoints", ge=1)
    progress: bool = param(True, bool, "show a progress bar")
    # --- training on many time grids (chapter 10) ------------------------------------------------------------
    # grid=random with random_K_max > K draws the number of steps of every iteration's grid uniformly from
    # K..random_K_max (and its interior times uniformly), so one continuous-time policy is trained on many grids.
    random_K_max: int = param(0, int, "grid=random: draw each iteration's K uniformly from K..random_K_max "
                              "(0: K fixed)", ge=0)
    # task-specific options (Task.options), set with --set key=value like the fields above
    options: dict = field(default_factory=dict)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the resolved configuration (checkpoints store it; resuming checks it)."""
        d = {k: v for k, v in self.to_dict().items() if k not in RESUME_KEYS}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


FIELD_PARAMS: dict[str, Param] = {f.name: f.metadata["param"] for f in dataclasses.fields(TrainConfig)
                                  if "param" in f.metadata}
IDENTITY_KEYS = ("preset", "algo", "seed", "profile")
"""Keys that identify a run; --set cannot change them (use the command's arguments)."""
RESUME_KEYS = ("iterations", "progress", "checkpoint_every", "eval_batch")
"""Keys that --set may change when resuming a run: they do not change what the iterations already done computed (more
iterations, the progress bar, how often checkpoints are written, the size of the final evaluation);
:meth:`TrainConfig.digest` leaves them out."""


@dataclass
class ConfigTable:
    """A task's defaults in one place: ``task`` for all its runs, ``algos[a]``, ``profiles[p]`` and
    ``profile_algos[(p, a)]`` (see the module docstring for the order)."""

    task: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    algos: dict = field(default_factory=dict)
    profile_algos: dict = field(default_factory=dict)

    def layers(self, profile: str, algo: str, preset: Mapping[str, Any] | None = None) -> list[tuple[str, dict]]:
        return [("task", self.task), ("preset", dict(preset or {})), (f"algorithm {algo}", self.algos.get(algo, {})),
                (f"profile {profile}", self.profiles.get(profile, {})),
                (f"profile {profile} + algorithm {algo}", self.profile_algos.get((profile, algo), {}))]


@dataclass
class ResolvedConfig:
    """A configuration with the source of every value."""

    cfg: TrainConfig
    sources: dict[str, str]

    def table(self) -> str:
        """Key, value, source and accepted values, one line per key (what --show-config prints)."""
        rows = []
        for k, v in self.cfg.to_dict().items():
            if k == "options":
                continue
            rows.append((k, v, self.sources.get(k, "default")))
        for k, v in self.cfg.options.items():
            rows.append((k, v, self.sources.get(k, "default")))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{w}}  {json.dumps(v):<28}  {src}" for k, v, src in rows)


def resolve_config(preset: str, algo: str, profile: str, seed: int, table: ConfigTable,
                   options: Mapping[str, Param] | None = None, overrides: Mapping[str, Any] | None = None,
                   preset_config: Mapping[str, Any] | None = None) -> ResolvedConfig:
    """The configuration of one run of a task (module docstring), validated. Raises ValueError/KeyError naming the
    offending key."""
    options = dict(options or {})
    FIELD_PARAMS["algo"].coerce("algo", algo)
    FIELD_PARAMS["profile"].coerce("profile", profile)
    FIELD_PARAMS["seed"].coerce("seed", seed)
    values: dict[str, Any] = {k: p.default for k, p in FIELD_PARAMS.items()}
    values |= {"preset": preset, "algo": algo, "profile": profile, "seed": int(seed)}
    opt_values = {k: p.default for k, p in options.items()}
    sources = {k: "default" for k in list(values) + list(opt_values)}
    for label, layer in table.layers(profile, algo, preset_config) + [("--set", dict(overrides or {}))]:
        for key, raw in layer.items():
            _set(values, opt_values, sources, options, key, raw, label)
    cfg = TrainConfig(**values, options=opt_values)
    validate(cfg, options)
    return ResolvedConfig(cfg, sources)


def _set(values: dict, opt_values: dict, sources: dict, options: Mapping[str, Param], key: str, raw: Any,
         label: str) -> None:
    if key in IDENTITY_KEYS and label == "--set":
        raise KeyError(f"{key} is not set with --set; give it as the command's argument (PRESET, --algo, --seed, "
                       "--profile)")
    if key in FIELD_PARAMS:
        values[key] = FIELD_PARAMS[key].coerce(key, raw)
    elif key in options:
        opt_values[key] = options[key].coerce(key, raw)
    else:
        extra = f"; options of this preset: {', '.join(sorted(options))}" if options else ""
        raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(FIELD_PARAMS))}{extra}")
    sources[key] = label


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], options: Mapping[str, Param] | None = None,
                    allowed: tuple[str, ...] | None = None) -> TrainConfig:
    """``cfg`` with validated ``--set`` overrides (e.g. more iterations when resuming; ``allowed`` restricts keys)."""
    options = dict(options or {})
    values = {k: v for k, v in cfg.to_dict().items() if k != "options"}
    opt_values, sources = dict(cfg.options), {}
    for key, raw in overrides.items():
        if allowed is not None and key not in allowed:
            raise KeyError(f"{key} cannot change when resuming a run (it would change what was trained); keys that "
                           f"may: {', '.join(allowed)}")
        _set(values, opt_values, sources, options or {k: Param(v, type(v)) for k, v in opt_values.items()}, key,
             raw, "--set")
    out = TrainConfig(**values, options=opt_values)
    validate(out, options)
    return out


def validate(cfg: TrainConfig, options: Mapping[str, Param] | None = None) -> None:
    """Check every value (types and ranges) and the relations between keys."""
    for k, p in FIELD_PARAMS.items():
        p.coerce(k, getattr(cfg, k))
    for k, p in (options or {}).items():
        if k in cfg.options:
            p.coerce(k, cfg.options[k])
    if cfg.grid == "random" and cfg.K < 2:
        raise ValueError("grid=random needs K >= 2 (a random grid has K - 1 interior times)")
    if cfg.kl == "girsanov" and (cfg.method not in ("em", "ddim") or cfg.eta == 0):
        raise ValueError(f"kl=girsanov needs a stochastic sampler (method em or ddim with eta > 0): its factor "
                         f"((1+eta^2)/(2 eta))^2 is infinite for method={cfg.method}, eta={cfg.eta}; use kl=chain")
    if cfg.random_K_max and (cfg.grid != "random" or cfg.random_K_max < cfg.K):
        raise ValueError(f"random_K_max={cfg.random_K_max} needs grid=random and random_K_max >= K={cfg.K} (each "
                         "iteration draws K uniformly from K..random_K_max)")
    if cfg.method in ("pf-euler", "pf-heun") or (cfg.method in ("em", "ddim") and cfg.eta == 0):
        if cfg.explore <= 0:
            raise ValueError(f"method={cfg.method} with eta={cfg.eta} is deterministic: its transitions have no "
                             "density; set explore > 0 (chapter 10)")


def parse_sets(items: list[str]) -> dict:
    """``["key=value", ...]`` from the command line as a dict (values stay strings; they are coerced per key)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set expects key=value; got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out
