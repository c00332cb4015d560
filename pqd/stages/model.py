"""model stage: the full-precision pipeline as a diffusers folder + model.json (source, sha256 of weights).

``demo:digits`` and ``demo:digits16`` train an embedded demo (a UNet on sklearn's digits, 8x8 gray or 16x16
RGB), ``demo:digits-dit`` a class-conditional DiT on the 8x8 digits, each with the digit feature network used
for the demos' FID; a local folder is loaded and re-saved; a hub id is snapshotted with
huggingface_hub (online users) and fails at once with a clear message when the hub cannot be reached.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pqd.diffusion import demo, digits
from pqd.diffusion.pipeline import (check_pipeline_folder, check_supported, denoiser_component, denoiser_of,
                                   load_pipeline)
from pqd.errors import HubError
from pqd.formats.files import atomic_dir, write_json
from pqd.formats.lineage import MODEL_RECORD, model_digest, weight_hashes
from pqd.formats.metrics import ModelMetrics
from pqd.formats.pipefolder import FEATURES_DIR
from pqd.params import DEMO_SOURCES, ModelParams, Params
from pqd.stages._cli import stage_main


def _train_demo(mp: ModelParams, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    pipe = demo.train_demo_pipeline(mp.source, seed=mp.seed, steps=mp.train_steps, batch_size=mp.batch_size,
                                    lr=mp.lr, channels=mp.channels, dit_width=mp.dit_width,
                                    dit_depth=mp.dit_depth)
    t_denoiser = time.perf_counter() - t0
    pipe.save_pretrained(out)
    # the FID features: the same 8x8 digits for both demos, seeded apart from the denoiser (model.feature_seed), so
    # models of different model.seed are measured with the same features
    images, labels = digits.load_digits_tensor()
    t0 = time.perf_counter()
    net, acc = demo.train_digit_net(images, labels, seed=mp.feature_seed, epochs=mp.feature_epochs)
    t_net = time.perf_counter() - t0
    (out / FEATURES_DIR).mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / FEATURES_DIR / "model.safetensors")
    (out / FEATURES_DIR / "config.json").write_text(json.dumps(net.config(), indent=2) + "\n")
    return {"unet_train_seconds": round(t_denoiser, 2), "digitnet_train_seconds": round(t_net, 2),
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
        raise HubError(f"model.source = {mp.source!r}: the Hugging Face hub cannot be reached from this machine; "
                              "download the pipeline elsewhere and set model.source to its local folder")
    try:
        return Path(snapshot_download(mp.source, revision=mp.revision, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; the user needs one line
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else type(e).__name__
        raise HubError(f"model.source = {mp.source!r}: the pipeline could not be fetched ({why}); "
                              "set model.source to a local diffusers folder, or unset HF_HUB_OFFLINE when online") from None


def run(params: Params, out: Path) -> ModelMetrics:
    mp = params.model
    src = mp.source
    local = None
    if src not in DEMO_SOURCES:
        local = Path(src).expanduser() if src.startswith(("/", ".", "~")) else None
        if local is not None:
            check_pipeline_folder(local)  # fail before any work
    torch.manual_seed(mp.seed)
    with atomic_dir(out) as tmp:
        if src in DEMO_SOURCES:
            info = _train_demo(mp, tmp)
        else:
            folder = local if local is not None else _snapshot(mp)
            pipe = load_pipeline(folder)
            check_supported(pipe)  # refuses unsupported architectures before anything is written
            pipe.save_pretrained(tmp, safe_serialization=True)
            info = {}
        weights = weight_hashes(tmp)
        component = denoiser_component(tmp)
        unet_bytes = sum((tmp / k).stat().st_size for k in weights if k.startswith(f"{component}/"))
        n_params = sum(p.numel() for p in denoiser_of(load_pipeline(tmp))[1].parameters())
        digest = model_digest(weights)
        # wall-clock timings go to the metrics only: model.json must be the same on every rerun
        facts = {k: v for k, v in info.items() if not k.endswith("_seconds")}
        write_json(tmp / MODEL_RECORD, {"source": src, "revision": mp.revision if local is None and src not in DEMO_SOURCES else None,
                                        "model_sha256": digest, "sha256": weights, **facts})
    return ModelMetrics(unet_parameters=n_params, unet_fp32_bytes=unet_bytes, **info)


def main(argv: list[str] | None = None) -> int:
    return stage_main("model", run, ["out"], argv)


if __name__ == "__main__":
    raise SystemExit(main())
