"""Time one LoRA training step: the built-in trainer against a plain eager diffusers+peft loop.

Both variants train LoRA rank 64 (alpha 32) on kohya's UNet targets of the same random-weight UNet
(SD 1.5 at 512 px, SDXL at 1024 px, built from the real architecture configs) in one process, at each
batch size, and report ms/step (median of the timed steps), images/s, the speed-up over the reference,
achieved TFLOP/s and MFU, and peak GPU memory.

* ``reference``: what a diffusers training example does: frozen UNet in bf16 with peft LoRA layers in
  float32, bf16 autocast, ``torch.optim.AdamW(fused=True)``, MSE on random latents and text embeddings.
* ``trainer``: the step of ``training/trainer.py``'s loop, run through the trainer's own helpers
  (``_place_models``, ``_build_optimization``, ``_loss``, ``_backward``, ``_optimizer_step``) on a
  ``_Run`` holding in-memory random-weight models; as in the loop it encodes the captions with the
  frozen text encoder(s), moves the cached (CPU) latents to the GPU and reads the loss with ``.item()``.

FLOPs are the model FLOPs of one reference step (UNet forward and backward with LoRA), counted once per
architecture and batch with ``torch.utils.flop_counter.FlopCounterMode``; TFLOP/s and MFU of both variants
use that same count, so work the trainer does beyond it (the text encoder) counts as overhead.

``--smoke`` runs everything on the CPU with tiny two-block models, to check the script end to end.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

RANK, ALPHA, LEARNING_RATE = 64, 32.0, 1e-4
# kohya's UNet targets: the Linear / 1x1 Conv2d layers inside Transformer2DModel blocks, by suffix.
REFERENCE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
ARCHS = {"sd15": "sd1", "sdxl": "sdxl"}  # CLI name -> training.models kind
# Dense bf16 tensor-core peak (TFLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0}
CAPTION = "a photo of a sks dog sitting on a wooden bench in a sunny park, detailed, high quality"

Step = Callable[[], None]


@dataclass
class Result:
    """One variant at one batch size; times in ms, memory in GiB (None where not measured)."""

    arch: str
    variant: str
    batch: int
    ms_per_step: Optional[float] = None
    images_per_s: Optional[float] = None
    speedup: Optional[float] = None
    model_tflop: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    step_ms: list = field(default_factory=list)
    error: Optional[str] = None


# --- models --------------------------------------------------------------------------------------------

def _real_layout(kind: str) -> dict[str, dict]:
    # The published SD 1.5 / SDXL configs. single_file_config_dir() would also write the CLIP tokenizer,
    # which needs open_clip, a package the GPU machines lack; the configs alone are all we need here.
    from training.models import _pipeline_layout

    return _pipeline_layout(kind)


def build_unet(kind: str, smoke: bool, device: torch.device) -> Any:
    """A random-weight ``UNet2DConditionModel`` of the real architecture (a tiny one when ``smoke``)."""
    from diffusers import UNet2DConditionModel

    from training.tiny import tiny_unet

    torch.manual_seed(0)
    if smoke:
        return tiny_unet(sdxl=kind == "sdxl").to(device)
    with torch.device(device):  # initialise on the GPU: building SDXL on the CPU takes minutes
        return UNet2DConditionModel.from_config(_real_layout(kind)["unet/config.json"])


def _text_encoders(kind: str, smoke: bool, device: torch.device) -> list:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training.tiny import TEXT_DIM_2, tiny_text_encoder

    sdxl = kind == "sdxl"
    if smoke:
        tes = [tiny_text_encoder(seed=2)]
        return tes + [tiny_text_encoder(with_projection=True, seed=3, hidden=TEXT_DIM_2)] if sdxl else tes
    layout = _real_layout(kind)
    names = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    with torch.device(device):
        return [(CLIPTextModelWithProjection if name.endswith("_2") else CLIPTextModel)(
            CLIPTextConfig.from_dict(layout[f"{name}/config.json"])).eval() for name in names]


def build_models(kind: str, smoke: bool, device: torch.device, folder: Path) -> Any:
    """Random-weight ``SDModels`` for the trainer: UNet, VAE, text encoder(s) and tokenizer(s).

    The tokenizers are byte-level CLIP tokenizers (the real BPE vocabulary needs open_clip); captions
    still become 77 token ids, so the text encoders do the same work.
    """
    from diffusers import AutoencoderKL

    from training.models import SDModels
    from training.tiny import tiny_tokenizer, tiny_vae

    sdxl = kind == "sdxl"
    unet = build_unet(kind, smoke, device)
    if smoke:
        vae = tiny_vae()
    else:
        with torch.device(device):
            vae = AutoencoderKL.from_config(_real_layout(kind)["vae/config.json"])
    tokenizers = [tiny_tokenizer(folder / "tok")]
    if sdxl:
        tokenizers.append(tiny_tokenizer(folder / "tok2", pad_token="!"))
    return SDModels(unet=unet, vae=vae, text_encoders=_text_encoders(kind, smoke, device), tokenizers=tokenizers,
                    scheduler_config={}, is_sdxl=sdxl, source="random weights")


def _vae_scale(smoke: bool) -> int:
    return 4 if smoke else 8  # tiny_vae has three blocks, the real VAE four


# --- the two variants ----------------------------------------------------------------------------------

def _conditioning(unet: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, Optional[dict]]:
    """Random text embeddings (and SDXL's pooled embedding and size ids) shaped for ``unet``."""
    cfg = unet.config
    hidden = torch.randn(batch, 77, cfg.cross_attention_dim, device=device)
    if cfg.addition_embed_type != "text_time":
        return hidden, None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    size = float(cfg.sample_size * 8)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device).repeat(batch, 1)
    return hidden, {"text_embeds": torch.randn(batch, pooled, device=device), "time_ids": time_ids}


def reference_model(kind: str, smoke: bool, device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    """The plain diffusers+peft set-up: frozen bf16 UNet (on CUDA), float32 LoRA, fused AdamW."""
    from peft import LoraConfig

    unet = build_unet(kind, smoke, device).requires_grad_(False)
    if device.type == "cuda":
        unet.to(dtype=torch.bfloat16)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True, target_modules=REFERENCE_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights stay float32 under autocast
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=device.type == "cuda")
    return unet, optimizer


def reference_step(unet: Any, optimizer: torch.optim.Optimizer, batch: int, device: torch.device) -> Step:
    """One eager step: noise the latents, predict the noise under bf16 autocast, MSE, backward, AdamW."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    hidden, added = _conditioning(unet, batch, device)

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_run(kind: str, smoke: bool, device: torch.device, folder: Path) -> Any:
    """A ``training.trainer._Run`` set up as ``_setup`` does, on in-memory models and without a dataset."""
    from training import trainer
    from training.config import TrainingConfig

    cfg = TrainingConfig(
        network_dim=RANK, network_alpha=ALPHA, network_train_unet_only=True, learning_rate=LEARNING_RATE,
        mixed_precision="bf16" if device.type == "cuda" else "no", cache_latents=True,
        max_train_steps=10**6, output_dir=str(folder / "run"), seed=0,
    )
    trainer._check_supported(cfg)
    models = build_models(kind, smoke, device, folder)
    run = trainer._Run(cfg=cfg, out=folder / "run", device=device,
                       autocast_dtype=trainer.MIXED_PRECISION_DTYPES[cfg.mixed_precision], seed=0, models=models,
                       network=trainer._build_network(cfg, models), dataset=None,
                       noise_scheduler=trainer._noise_scheduler(cfg))
    trainer._place_models(run)
    run.steps_per_epoch, run.epochs, run.total_steps = cfg.max_train_steps, 1, cfg.max_train_steps
    trainer._build_optimization(run)
    return run


def trainer_step(run: Any, batch: int, smoke: bool) -> Step:
    """The body of ``trainer._train_epoch`` for one batch with cached latents (no accumulation)."""
    from training import trainer
    from training.data import Batch

    size = run.models.unet.config.sample_size
    px = size * _vae_scale(smoke)
    data = Batch(indices=list(range(batch)), captions=[CAPTION] * batch, flipped=[False] * batch, pixels=None,
                 latents=torch.randn(batch, 4, size, size), original_hw=[(px, px)] * batch,
                 crop_top_left=[(0, 0)] * batch, target_hw=[(px, px)] * batch)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    accum = run.cfg.gradient_accumulation_steps

    def step() -> None:
        loss = trainer._loss(run, data)
        trainer._backward(run, loss / accum)
        loss.item()  # the loop reads every step's loss for its log
        trainer._optimizer_step(run, params)

    return step
