"""What a Stable Diffusion run needs on this machine, checked before anything is loaded; the hub kept offline.

Unless ``--set allow_download=true``, :func:`hub_offline` sets ``HF_HUB_OFFLINE=1`` (and the equivalents of the other
hub libraries) before diffusers or transformers is imported, so no library resolves a host or opens a connection
(``local_files_only`` alone does not stop the hub client's own look-ups). :func:`check_local_files` then looks for
every piece the run needs — the pipeline weights, the reward's package and weights, the launcher's settings of a
multi-process run — and reports all missing ones in one message, each with the command that fetches it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
# modules that copy huggingface_hub's offline flag at import time (patched when they are already imported)
_OFFLINE_FLAG_COPIES = ("huggingface_hub.constants", "diffusers.utils.hub_utils", "diffusers.loaders.lora_base",
                        "diffusers.models.attention_dispatch")

SD15_HUB_ID = "runwayml/stable-diffusion-v1-5"
SD15_MIRROR = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac+logos+ava1-l14-linearMSE.pth")


_saved: dict | None = None          # what hub_offline(True) replaced, restored by hub_offline(False)


def hub_offline(on: bool = True) -> None:
    """Keep every Hugging Face library off the network in this process (environment variables, and the flags of
    modules that already read them); ``on=False`` restores what an earlier call changed (``allow_download=true``)."""
    global _saved
    if on:
        if _saved is None:
            _saved = {"env": {k: os.environ.get(k) for k in OFFLINE_ENV},
                      "flags": {(m, f): getattr(sys.modules[m], f) for m in _OFFLINE_FLAG_COPIES if m in sys.modules
                                for f in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY") if hasattr(sys.modules[m], f)}}
        os.environ.update(OFFLINE_ENV)
        for name in _OFFLINE_FLAG_COPIES:
            mod = sys.modules.get(name)
            for flag in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
                if mod is not None and hasattr(mod, flag):
                    setattr(mod, flag, True)
    elif _saved is not None:
        for k, v in _saved["env"].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for (m, f), v in _saved["flags"].items():
            setattr(sys.modules[m], f, v)
        _saved = None


@dataclass(frozen=True)
class MissingPiece:
    """Something a run needs that is not on this machine, and the command that fetches it."""

    what: str
    fetch: str


class MissingLocalFiles(FileNotFoundError):
    """One or more pieces a Stable Diffusion run needs are missing; the message lists them all."""

    def __init__(self, pieces: list[MissingPiece], preset: str = ""):
        self.pieces = pieces
        lines = [f"the Stable Diffusion run{' ' + preset if preset else ''} cannot start: {len(pieces)} missing "
                 f"piece{'s' if len(pieces) > 1 else ''} (nothing is downloaded unless --set allow_download=true "
                 "for the pipeline weights):"]
        for i, p in enumerate(pieces, 1):
            lines.append(f"  {i}. {p.what}\n     fetch: {p.fetch}")
        super().__init__("\n".join(lines))


def _cached(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub repository ``repo_id`` in the local Hugging Face cache (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:                 # noqa: BLE001 - an invalid repo id is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _is_path(spec: str) -> bool:
    """Whether a model spec names a folder rather than a hub id ``org/name``."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") != 1 or Path(spec).expanduser().exists()


def pipeline_pieces(model: str) -> list[MissingPiece]:
    """The Stable Diffusion pipeline ``model`` (a folder or a hub id in the cache); nothing for the tiny one."""
    if model == "tiny":
        return []
    hub_hint = (f" (the {SD15_HUB_ID} repository may no longer resolve on the hub; {SD15_MIRROR} holds the same "
                f"weights: fetch it and --set model={SD15_MIRROR})" if model == SD15_HUB_ID else "")
    fetch = (f"python -c \"from diffusers import StableDiffusionPipeline as P; "
             f"P.from_pretrained('{SD15_MIRROR if model == SD15_HUB_ID else model}')\"{hub_hint}; or --set "
             "allow_download=true")
    if _is_path(model):
        local = Path(model).expanduser()
        if not local.is_dir():
            return [MissingPiece(f"Stable Diffusion pipeline folder {local} (not found)",
                                 f"python -c \"from diffusers import StableDiffusionPipeline as P; "
                                 f"P.from_pretrained('{SD15_MIRROR}').save_pretrained('{local}')\"")]
        if not (local / "model_index.json").exists():
            return [MissingPiece(f"Stable Diffusion pipeline folder {local} (it has no model_index.json: not a "
                                 "diffusers pipeline)", f"python -c \"from diffusers import StableDiffusionPipeline "
                                 f"as P; P.from_pretrained('{SD15_MIRROR}').save_pretrained('{local}')\"")]
        return []
    index = _cached(model, "model_index.json")
    if index is None:
        from huggingface_hub.constants import HF_HUB_CACHE
        return [MissingPiece(f"Stable Diffusion weights {model!r} (not in the Hugging Face cache {HF_HUB_CACHE})",
                             fetch)]
    absent = [p for p in PIPELINE_PARTS if not (index.parent / p).is_dir()]
    if absent:
        return [MissingPiece(f"Stable Diffusion weights {model!r} are only partly in the cache (no "
                             f"{', '.join(absent)})", fetch)]
    return []


def reward_pieces(reward: str, options: dict) -> list[MissingPiece]:
    """The package and weights of the reward ``reward`` (paths from ``options`` or the SACODE_* variables)."""
    out = []
    if reward == "imagereward":
        folder = Path(options.get("imagereward") or os.environ.get("SACODE_IMAGEREWARD") or
                      "~/.cache/ImageReward").expanduser()
        load = (f"python -c \"import ImageReward as RM; RM.load('ImageReward-v1.0', download_root='{folder}')\"")
        if importlib.util.find_spec("ImageReward") is None:
            out.append(MissingPiece("the image-reward package", "pip install image-reward   (it also needs "
                                    "torchvision matching your torch)"))
        files = [f for f in ("ImageReward.pt", "med_config.json") if not (folder / f).is_file()]
        if files:
            out.append(MissingPiece(f"ImageReward weights {', '.join(files)} in {folder} (set imagereward=FOLDER)",
                                    load))
        if _cached("bert-base-uncased", "vocab.txt") is None:
            out.append(MissingPiece("the bert-base-uncased tokenizer in the Hugging Face cache (ImageReward's BLIP "
                                    "text encoder loads it)", f"hf download bert-base-uncased   (or the command "
                                    "of the ImageReward weights above)"))
    elif reward == "aesthetic":
        mlp = options.get("aesthetic_mlp") or os.environ.get("SACODE_AESTHETIC_MLP", "")
        if not (mlp and Path(mlp).expanduser().is_file()):
            out.append(MissingPiece(f"the LAION aesthetic MLP weights {mlp or '(aesthetic_mlp is not set)'}",
                                    f"wget {AESTHETIC_URL}   then --set aesthetic_mlp=PATH"))
        clip = options.get("clip_model") or os.environ.get("SACODE_CLIP_MODEL", "") or CLIP_L14
        if _is_path(clip):
            if not (Path(clip).expanduser() / "config.json").is_file():
                out.append(MissingPiece(f"CLIP ViT-L/14 folder {clip} (no config.json)",
                                        f"hf download {CLIP_L14} --local-dir {clip}"))
        elif _cached(clip, "config.json") is None:
            out.append(MissingPiece(f"CLIP model {clip!r} (not in the Hugging Face cache)", f"hf download {clip}"))
    return out


def launcher_pieces() -> list[MissingPiece]:
    """A multi-process run (WORLD_SIZE > 1) needs its launcher's rendezvous address."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return [MissingPiece(f"the rendezvous of a {world}-process run (WORLD_SIZE={world} but MASTER_ADDR/"
                             "MASTER_PORT are not set)", f"accelerate launch --num_processes {world} -m sacode train "
                             "...   (or run `accelerate config` once and use accelerate launch)")]
    return []


def check_local_files(model: str, options: dict, preset: str = "") -> None:
    """Raise :class:`MissingLocalFiles` listing every missing piece of a run (pipeline weights unless
    ``options["allow_download"]``, reward package and weights, launcher); return when nothing is missing."""
    pieces = [] if options.get("allow_download") else pipeline_pieces(model)
    pieces += reward_pieces(str(options.get("reward", "")), options) + launcher_pieces()
    if pieces:
        raise MissingLocalFiles(pieces, preset)
