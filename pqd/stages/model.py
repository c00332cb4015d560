"""model stage: the full-precision pipeline as a diffusers folder + model.json (source, sha256 of weights).

``demo:digits`` trains the embedded demo (UNet DDPM on sklearn's 8x8 digits, and the digit feature
network used for the demo's FID); a local folder is loaded and re-saved; a hub id is snapshotted with
huggingface_hub (online users) and fails at once with a clear message when the hub cannot be reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from pqd.diffusion.adapter import check_pipeline_folder, denoiser_from_pipeline, load_pipeline
from pqd.fid import FEATURES_DIR
from pqd.io import atomic_dir, hash_tree, write_json
from pqd.params import ModelParams, Params

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def _train_demo(mp: ModelParams, out: Path) -> dict[str, Any]:
    from diffusers import DDPMPipeline
    from safetensors.torch import save_file

    from pqd.diffusion import demo

    images, labels = demo.load_digits_tensor()
    t0 = time.perf_counter()
    unet = demo.train_demo_unet(images, seed=mp.seed, steps=mp.train_steps, batch_size=mp.batch_size,
                                lr=mp.lr, channels=mp.channels)
    t_unet = time.perf_counter() - t0
    DDPMPipeline(unet=unet, scheduler=demo.build_demo_scheduler()).save_pretrained(out)
    t0 = time.perf_counter()
    net, acc = demo.train_digit_net(images, labels, seed=mp.seed, epochs=mp.feature_epochs)
    t_net = time.perf_counter() - t0
    (out / FEATURES_DIR).mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / FEATURES_DIR / "model.safetensors")
    (out / FEATURES_DIR / "config.json").write_text(json.dumps(net.config(), indent=2) + "\n")
    return {"unet_train_seconds": round(t_unet, 2), "digitnet_train_seconds": round(t_net, 2),
            "digitnet_heldout_accuracy": round(acc, 4)}


def _hub_reachable(host: str = "huggingface.co", timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _snapshot(mp: ModelParams) -> Path:
    """Download a hub pipeline (or take it from the local hub cache) and return its folder."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline and not _hub_reachable():
        raise ConnectionError(f"model.source = {mp.source!r}: the Hugging Face hub cannot be reached from this machine; "
                              "download the pipeline elsewhere and set model.source to its local folder")
    try:
        return Path(snapshot_download(mp.source, revision=mp.revision, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; the user needs one line
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else type(e).__name__
        raise ConnectionError(f"model.source = {mp.source!r}: the pipeline could not be fetched ({why}); "
                              "set model.source to a local diffusers folder, or unset HF_HUB_OFFLINE when online") from None


def run(params: Params, out: Path) -> dict[str, Any]:
    mp = params.model
    src = mp.source
    local = None
    if src != "demo:digits":
        local = Path(src).expanduser() if src.startswith(("/", ".", "~")) else None
        if local is not None:
            check_pipeline_folder(local)  # fail before any work
    torch.manual_seed(mp.seed)
    with atomic_dir(out) as tmp:
        if src == "demo:digits":
            info = _train_demo(mp, tmp)
        else:
            folder = local if local is not None else _snapshot(mp)
            pipe = load_pipeline(folder)
            denoiser_from_pipeline(pipe)  # refuses unsupported architectures before anything is written
            pipe.save_pretrained(tmp, safe_serialization=True)
            info = {}
        weights = {k: v for k, v in hash_tree(tmp).items() if k.endswith(WEIGHT_SUFFIXES)}
        unet_bytes = sum((tmp / k).stat().st_size for k in weights if k.startswith("unet/"))
        n_params = sum(p.numel() for p in load_pipeline(tmp).unet.parameters())
        digest = model_digest(weights)
        # wall-clock timings go to the metrics only: model.json must be the same on every rerun
        facts = {k: v for k, v in info.items() if not k.endswith("_seconds")}
        write_json(tmp / "model.json", {"source": src, "revision": mp.revision if local is None and src != "demo:digits" else None,
                                        "model_sha256": digest, "sha256": weights, **facts})
    return {"unet_parameters": n_params, "unet_fp32_bytes": unet_bytes, **info}


def model_digest(weights: dict[str, str]) -> str:
    """One sha256 for the whole model: over the sorted 'path sha256' lines of its weight files."""
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(weights.items())).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    from pqd.stages._cli import stage_main

    return stage_main("model", run, ["out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
