"""Stable Diffusion runs without the network: no socket beyond loopback, every missing piece reported at once and
before anything loads, and a byte-reproducible LoRA export (chapter 12's presets; the tiny pipeline is built
locally)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from sacode.envs.sd.local_files import MissingLocalFiles, check_local_files  # noqa: E402
from sacode.envs.sd.policy import canonical_safetensors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# an audit hook that records (and refuses) every name look-up or connection to a host other than loopback
NO_NETWORK = r'''
import json, os, sys
LOG = os.environ["SOCKET_LOG"]
LOOPBACK = ("localhost", "127.0.0.1", "::1", "")

def hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    host = host.decode() if isinstance(host, bytes) else str(host or "")
    if host not in LOOPBACK and not host.startswith("127."):
        with open(LOG, "a") as f:
            f.write(f"{event} {host}\n")
        raise ConnectionRefusedError(f"no network in this test ({event} {host})")

sys.addaudithook(hook)
'''


def offline_env(tmp_path: Path) -> dict:
    """The environment of a user who set nothing: no HF_HUB_OFFLINE, an empty Hugging Face home."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                             "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                                                             "SACODE_SD_MODEL", "HF_HUB_CACHE")}
    return env | {"HF_HOME": str(tmp_path / "hf-home"), "SOCKET_LOG": str(tmp_path / "sockets.log"),
                  "SACODE_IMAGEREWARD": str(tmp_path / "no-imagereward"), "PYTHONPATH": str(REPO)}


def test_the_no_network_hook_catches_the_hub_clients_own_look_up(tmp_path):
    """The check can fail: with nothing set, building the hub's request headers already resolves huggingface.co
    (its agent detection fetches a registry), and the hook records it."""
    script = NO_NETWORK + "from huggingface_hub.utils import build_hf_headers\nbuild_hf_headers()\n"
    r = subprocess.run([sys.executable, "-c", script], env=offline_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "huggingface.co" in (tmp_path / "sockets.log").read_text()


def test_sd_runs_open_no_socket_and_list_every_missing_piece(tmp_path):
    """A run whose pipeline sits in the Hugging Face cache under a hub id (the tiny one, as SD v1.5 would after
    fetching it) trains, and sd15-imagereward (nothing downloaded) fails with one message listing every missing
    piece; neither resolves a host or opens a connection beyond loopback. Without HF_HUB_OFFLINE the first one
    resolves huggingface.co even with local_files_only (the hub client's agent detection)."""
    from sacode.envs.sd.tiny import tiny_pipeline_path

    rev = "0" * 40
    cached = tmp_path / "hf-home" / "hub" / "models--sacode--tiny-sd"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(rev)
    shutil.copytree(tiny_pipeline_path(), cached / "snapshots" / rev)
    tiny = ["train", "sd-tiny-compressibility", "--profile", "ci", "--out", str(tmp_path / "tiny"), "--no-progress",
            "--set", "model=sacode/tiny-sd", "--set", "iterations=1", "--set", "image_every=0",
            "--set", "export_lora=true"]
    sd15 = ["train", "sd15-imagereward", "--profile", "ci", "--out", str(tmp_path / "sd15"), "--no-progress"]
    script = NO_NETWORK + (
        "from sacode.cli import main\n"
        f"print('RC', json.dumps([main(c) for c in {json.dumps([tiny, sd15])}]))\n")
    r = subprocess.run([sys.executable, "-c", script], env=offline_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    log = tmp_path / "sockets.log"
    assert not log.exists(), log.read_text()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.split("RC", 1)[1]) == [0, 2], r.stderr
    assert (tmp_path / "tiny" / "lora" / "pytorch_lora_weights.safetensors").exists()
    msg = r.stderr[r.stderr.index("error: the Stable Diffusion run sd15-imagereward cannot start"):]
    assert "Traceback" not in r.stderr
    assert "Stable Diffusion weights 'runwayml/stable-diffusion-v1-5'" in msg and "from_pretrained(" in msg
    assert "ImageReward weights ImageReward.pt, med_config.json" in msg and "RM.load('ImageReward-v1.0'" in msg
    assert "bert-base-uncased" in msg and "hf download bert-base-uncased" in msg
    if importlib.util.find_spec("ImageReward") is None:
        assert "the image-reward package" in msg and "pip install image-reward" in msg
    assert not (tmp_path / "sd15").exists()                    # nothing was created


def _fake_hub_cache(cache: Path, repo: str, files: list[str]) -> None:
    """A Hugging Face cache entry for ``repo`` holding ``files`` (the layout huggingface_hub reads offline)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    snap = root / "snapshots" / ("0" * 40)
    for f in files:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_text("{}")


def test_missing_pieces_are_found_before_loading_and_reported_together(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = {"allow_download": False, "reward": "aesthetic", "aesthetic_mlp": str(tmp_path / "mlp.pth"),
            "clip_model": "openai/clip-vit-large-patch14"}
    with pytest.raises(MissingLocalFiles) as info:
        check_local_files("org/sd-model", base)
    whats = [p.what for p in info.value.pieces]
    assert len(whats) == 3 and "org/sd-model" in whats[0] and "aesthetic MLP" in whats[1] and "CLIP" in whats[2]
    assert str(info.value).count("fetch: ") == 3
    # the pieces present: a cached pipeline, the MLP file, CLIP in the cache -> nothing missing
    _fake_hub_cache(tmp_path / "cache", "org/sd-model",
                    ["model_index.json"] + [f"{p}/config.json" for p in ("unet", "vae", "text_encoder", "tokenizer",
                                                                         "scheduler")])
    _fake_hub_cache(tmp_path / "cache", "openai/clip-vit-large-patch14", ["config.json"])
    (tmp_path / "mlp.pth").write_bytes(b"x")
    check_local_files("org/sd-model", base)
    # a partial download, a folder that is not a pipeline, a multi-process launch without its rendezvous
    _fake_hub_cache(tmp_path / "cache", "org/partial", ["model_index.json", "unet/config.json"])
    (tmp_path / "not-a-pipeline").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for model, text in (("org/partial", "only partly in the cache (no vae, text_encoder, tokenizer, scheduler)"),
                        (str(tmp_path / "not-a-pipeline"), "no model_index.json")):
        with pytest.raises(MissingLocalFiles) as info:
            check_local_files(model, base)
        assert text in info.value.pieces[0].what and "accelerate launch --num_processes 4" in str(info.value)
    monkeypatch.delenv("WORLD_SIZE")
    check_local_files("org/partial", base | {"allow_download": True})        # downloading completes it


LORA_SCRIPT = r'''
import hashlib, sys, torch
from sacode.envs.sd.env import SDEnv
from sacode.envs.sd.policy import LoRAScorePolicy
from sacode.envs.sd.prompts import PromptSampler
from sacode.envs.sd.rewards import JpegCompressibility
from sacode.envs.sd.task import load_pipeline
torch.manual_seed(0)
env = SDEnv(load_pipeline("tiny"), JpegCompressibility(), PromptSampler.named("a cat"), guidance=3.0, resolution=32)
pol = LoRAScorePolicy(env, rank=4, target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv_out"))
print("SHA", hashlib.sha256(pol.export_lora(sys.argv[1]).read_bytes()).hexdigest())
'''


def test_lora_export_is_byte_reproducible(tmp_path):
    """The same LoRA exported by two processes with different hash seeds gives the same bytes (before, the
    metadata's target_modules followed set order, and the header followed a hash map's)."""
    digests = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        r = subprocess.run([sys.executable, "-c", LORA_SCRIPT, str(tmp_path / f"lora-{seed}")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        digests.append(r.stdout.split("SHA ")[1].strip())
    assert digests[0] == digests[1]
    assert not [p for p in (tmp_path / "lora-1").iterdir() if p.name.startswith(".")]   # no scratch files left


def test_canonical_safetensors_fixes_the_header_order_and_keeps_the_tensors(tmp_path):
    import struct

    from safetensors.torch import load, save

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    data = save(tensors, metadata={"z": "1", "format": "pt"})
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    shuffled = dict(reversed(list(header.items())))
    shuffled["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(shuffled, separators=(",", ":")).encode()
    other = struct.pack("<Q", len(text)) + text + data[8 + n:]
    assert other != data and canonical_safetensors(other) == canonical_safetensors(data)
    back = load(canonical_safetensors(other))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert hashlib.sha256(canonical_safetensors(data)).digest() == hashlib.sha256(
        canonical_safetensors(canonical_safetensors(data))).digest()                  # idempotent
