"""Time one LoRA training step: the built-in trainer against a plain eager diffusers+peft loop.

Both variants train LoRA rank 64 (alpha 32) on kohya's UNet targets of the same random-weight UNet
(SD 1.5 at 512 px, SDXL at 1024 px, built from the real architecture configs) in one process, at each
batch size, and report ms/step (median of the timed steps), images/s, the speed-up over the reference,
achieved TFLOP/s and MFU, and peak GPU memory.

* ``reference``: what a diffusers training example does: frozen UNet in bf16 with peft LoRA layers in
  float32, bf16 autocast, ``torch.optim.AdamW(fused=True)``, MSE on random latents and text embeddings.
* ``trainer``: the step of ``training/trainer.py``'s loop (``training.trainer.TrainStep``: the run's
  set-up and ``train_step`` without a dataset) on in-memory random-weight models, with the fast path of
  ``training/fast.py``: UNet
  step compiled (CUDA graphs), caption embeddings cached with the text encoders and VAE moved off the
  GPU, cached latents copied from pinned memory, losses kept on the device. Its first call (which
  compiles, or loads the compiled kernels from the cache) is timed apart as ``first_step_s``.
* ``trainer-eager`` (only with ``--variants``): the same with ``LORA_SEARCH_EAGER=1``, the trainer's
  plain step.
* ``trainer-te`` (only with ``--variants``): the search's usual set-up, with the text-encoder LoRA trained
  too, so the captions are tokenized and encoded (compiled) in every step; its TE work counts as overhead
  in TFLOP/s and MFU.
* ``trainer-dynamic`` (only with ``--variants``): ``trainer`` after one step on latents 8 rows shorter, as a
  run's second bucket: torch then compiles a graph with symbolic sizes, and that graph is what is timed
  (the graph every bucket of a run after its first uses). Its ``compile_s`` counts both compilations.

On CUDA each variant's step also runs once under ``torch.cuda.set_sync_debug_mode``, and the number of
host-device synchronisations it made is reported (``syncs``).

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
from functools import partial
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
VARIANTS = ("reference", "trainer", "trainer-eager", "trainer-te", "trainer-dynamic")


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
    first_step_s: Optional[float] = None
    compile_s: Optional[float] = None
    compiled: Optional[bool] = None
    syncs: Optional[int] = None
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

def _conditioning(unet: Any, batch: int, device: torch.device, px: int) -> tuple[torch.Tensor, Optional[dict]]:
    """Random text embeddings (and SDXL's pooled embedding and ``px``-square size ids) shaped for ``unet``."""
    cfg = unet.config
    hidden = torch.randn(batch, 77, cfg.cross_attention_dim, device=device)
    if cfg.addition_embed_type != "text_time":
        return hidden, None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32, device=device).repeat(batch, 1)
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


def reference_step(unet: Any, optimizer: torch.optim.Optimizer, batch: int, device: torch.device,
                   smoke: bool) -> Step:
    """One eager step: noise the latents, predict the noise under bf16 autocast, MSE, backward, AdamW."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    hidden, added = _conditioning(unet, batch, device, size * _vae_scale(smoke))

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


def trainer_config(device: torch.device, folder: Path, train_text_encoder: bool = False) -> Any:
    """The trainer's config for the benchmark: LoRA rank 64 / alpha 32, bf16 on CUDA, cached latents."""
    from training.config import TrainingConfig

    return TrainingConfig(
        network_dim=RANK, network_alpha=ALPHA, network_train_unet_only=not train_text_encoder,
        learning_rate=LEARNING_RATE, mixed_precision="bf16" if device.type == "cuda" else "no", cache_latents=True,
        max_train_steps=10**6, output_dir=str(folder / "run"), seed=0,
    )


def trainer_setup(kind: str, smoke: bool, device: torch.device, folder: Path, eager: bool = False,
                  train_text_encoder: bool = False) -> Any:
    """``training.trainer.TrainStep`` on in-memory random-weight models, with the benchmark's caption cached.

    ``eager``: set up with ``LORA_SEARCH_EAGER=1`` (no compile, no caption cache, nothing offloaded).
    ``train_text_encoder``: LoRA on the text encoder(s) too (same rank and learning rate).
    """
    import os

    from training import fast
    from training.trainer import TrainStep

    models = build_models(kind, smoke, device, folder)
    saved = os.environ.get(fast.EAGER_ENV)
    os.environ[fast.EAGER_ENV] = "1" if eager else "0"
    try:
        return TrainStep(trainer_config(device, folder, train_text_encoder), models, {CAPTION}, device)
    finally:
        os.environ.pop(fast.EAGER_ENV) if saved is None else os.environ.__setitem__(fast.EAGER_ENV, saved)


def latent_batch(unet: Any, batch: int, smoke: bool, height: Optional[int] = None) -> Any:
    """A ``training.data.Batch`` of random cached latents (``height`` latent rows, default the UNet's size)."""
    from training.data import Batch

    size = unet.config.sample_size
    height = height or size
    scale = _vae_scale(smoke)
    return Batch(indices=list(range(batch)), captions=[CAPTION] * batch, flipped=[False] * batch, pixels=None,
                 latents=torch.randn(batch, 4, height, size), original_hw=[(height * scale, size * scale)] * batch,
                 crop_top_left=[(0, 0)] * batch, target_hw=[(height * scale, size * scale)] * batch)


def trainer_step(step: Any, batch: int, smoke: bool, other_bucket_first: bool = False) -> Step:
    """One optimizer step of the trainer (no accumulation) on a batch of cached latents.

    ``other_bucket_first``: call it once on a batch of another height first, as a run's second bucket
    does, so the timed shape runs the graph torch compiled with symbolic sizes.
    """
    unet = step.run.models.unet
    if other_bucket_first:
        step([latent_batch(unet, batch, smoke, height=unet.config.sample_size - 8)])
    data = [latent_batch(unet, batch, smoke)] * step.run.cfg.gradient_accumulation_steps
    return partial(step, data)


# --- measuring -----------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` timed calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def count_syncs(step: Step, device: torch.device) -> Optional[int]:
    """How many times one call of ``step`` made the host wait for the GPU (None off CUDA)."""
    import warnings

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def count_flops(step: Step) -> float:
    """FLOPs of one call of ``step`` (matrix products, convolutions and attention), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(arch: str, variant: str, batch: int, make_step: Callable[[int], Step], args: argparse.Namespace,
            device: torch.device) -> Result:
    """Time one variant at one batch size; an out-of-memory error is recorded, not raised."""
    result = Result(arch=arch, variant=variant, batch=batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = make_step(batch)
        started = time.perf_counter()
        step()  # the first call pays one-time set-up (compilation), not counted in ms/step
        _sync(device)
        result.first_step_s = round(time.perf_counter() - started, 2)
        if variant == "reference":
            result.model_tflop = count_flops(step) / 1e12
        result.step_ms = time_step(step, args.steps, args.warmup, device)
        result.syncs = count_syncs(step, device)
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
        return result
    finally:
        step = None
        gc.collect()
    result.ms_per_step = statistics.median(result.step_ms)
    result.images_per_s = batch * 1000 / result.ms_per_step
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_arch(arch: str, args: argparse.Namespace, device: torch.device) -> list[Result]:
    """Every variant of ``arch`` at every batch size: the reference first, each model freed after its runs."""
    from training import fast

    kind, results = ARCHS[arch], []
    if "reference" in args.variants:
        unet, optimizer = reference_model(kind, args.smoke, device)
        make_step = partial(reference_step, unet, optimizer, device=device, smoke=args.smoke)
        for batch in args.batches:
            results.append(measure(arch, "reference", batch, make_step, args, device))
        del unet, optimizer, make_step
        _free(device)
    for variant in [v for v in args.variants if v != "reference"]:
        with tempfile.TemporaryDirectory(prefix="lora-search-bench-") as folder:
            step = trainer_setup(kind, args.smoke, device, Path(folder), eager=variant == "trainer-eager",
                                 train_text_encoder=variant == "trainer-te")
            for batch in args.batches:
                before = step.compile_seconds
                make_step = partial(trainer_step, step, smoke=args.smoke, other_bucket_first=variant == "trainer-dynamic")
                result = measure(arch, variant, batch, make_step, args, device)
                result.compiled, result.compile_s = step.compiled, round(step.compile_seconds - before, 2)
                results.append(result)
                if step.run.compiling:
                    fast.release_compiled()  # each batch size its own static graph, as a padded run has
            step.close()
            del step, make_step
        _free(device)
    return results


def add_ratios(results: list[Result], peak_tflops: Optional[float]) -> None:
    """Fill in each result's speed-up over the reference and its TFLOP/s and MFU on the model FLOPs."""
    refs = {(r.arch, r.batch): r for r in results if r.variant == "reference"}
    for r in results:
        ref = refs.get((r.arch, r.batch))
        if r.ms_per_step is None or ref is None:
            continue
        r.model_tflop = ref.model_tflop
        if ref.ms_per_step:
            r.speedup = ref.ms_per_step / r.ms_per_step
        if r.model_tflop is not None:
            r.tflops = r.model_tflop / (r.ms_per_step / 1000)
            r.mfu = r.tflops / peak_tflops if peak_tflops else None


# --- report --------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """The accelerator's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops_for(name: str, override: Optional[float]) -> Optional[float]:
    """The device's dense bf16 peak in TFLOP/s: ``override`` when given, else from the table, else None."""
    if override:
        return override
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def _fmt(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def format_table(results: list[Result]) -> str:
    """A plain-text table, one row per architecture, variant and batch size."""
    head = ("arch", "variant", "batch", "ms/step", "img/s", "x ref", "TFLOP/step", "TFLOP/s", "MFU %", "peak GiB",
            "1st s", "compiled", "syncs")
    rows = [head]
    for r in results:
        if r.error:
            rows.append((r.arch, r.variant, str(r.batch), r.error) + ("",) * (len(head) - 4))
            continue
        rows.append((r.arch, r.variant, str(r.batch), _fmt(r.ms_per_step, ".1f"), _fmt(r.images_per_s, ".2f"),
                     _fmt(r.speedup, ".2f"), _fmt(r.model_tflop, ".3g"), _fmt(r.tflops, ".3g"), _fmt(r.mfu, ".1f", 100),
                     _fmt(r.peak_mem_gib, ".2f"), _fmt(r.first_step_s, ".1f"),
                     "n/a" if r.compiled is None else ("yes" if r.compiled else "no"),
                     "n/a" if r.syncs is None else str(r.syncs)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    def line(row: tuple) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row) for row in rows)


def write_json(path: Path, results: list[Result], args: argparse.Namespace, name: str,
               peak: Optional[float]) -> Path:
    """Write the settings, versions and every result (with each timed step) to ``path`` atomically."""
    import diffusers
    import peft

    from training.atomic import atomic_write_text

    payload = {
        "device": name, "peak_tflops": peak, "smoke": args.smoke, "steps": args.steps, "warmup": args.warmup,
        "rank": RANK, "alpha": ALPHA, "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                                   "peft": peft.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": [asdict(r) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# --- command line --------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; ``--smoke`` changes the defaults to a few tiny CPU steps at batch 1 and 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl", "both"], default="both")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,4,8; smoke 1,2)")
    parser.add_argument("--steps", type=int, help="timed steps per variant and batch (default 20; smoke 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 5; smoke 1)")
    parser.add_argument("--variants", default="reference,trainer",
                        help="comma-separated, from " + ", ".join(VARIANTS) + " (default reference,trainer)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny two-block models: a quick end-to-end check")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU on unlisted devices")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/train_step-<device>.json)")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,4,8")).split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: give whole numbers separated by commas, e.g. 1,4,8")
    if not batches or min(batches) < 1:
        parser.error(f"--batches {args.batches!r}: batch sizes must be at least 1")
    args.batches = batches
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants {','.join(unknown) or '(none)'}: choose from {', '.join(VARIANTS)}")
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark, print the table and write the JSON; returns the exit code."""
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: real SD shapes on the CPU would take hours; use --smoke", file=sys.stderr)
        return 2
    name = device_name(device)
    peak = peak_tflops_for(name, args.peak_tflops)
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and spinning ones stall a busy machine
    try:
        results = [r for arch in (["sd15", "sdxl"] if args.arch == "both" else [args.arch])
                   for r in bench_arch(arch, args, device)]
    finally:
        torch.set_num_threads(threads)
    add_ratios(results, peak)
    out = args.out or Path(__file__).resolve().parent / "results" / f"train_step-{_slug(name)}.json"
    print(f"device: {name}; peak {_fmt(peak, '.0f')} TFLOP/s; {args.steps} timed steps after {args.warmup} warm-up; "
          f"LoRA rank {RANK} alpha {ALPHA:g}")
    print(format_table(results))
    print(f"wrote {write_json(out, results, args, name, peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
