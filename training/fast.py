"""What makes the training step fast on a GPU, apart from the loop's bookkeeping in ``training.trainer``.

A plain (eager) PyTorch step spends most of its time on a GPU waiting for thousands of small kernel
launches, and every host-device synchronisation stalls the queue. So:

* :class:`UnetLoss` runs the UNet forward and the loss (and :class:`Compiled` the text encoders when
  they run in the step) through ``torch.compile`` (config ``torch_compile``: unset means on with CUDA,
  off on the CPU) with the ``dynamo_backend``; on CUDA the inductor backend runs in ``reduce-overhead``
  mode, which replays the step as CUDA graphs. Batches are padded to one shape per bucket
  (``TrainDataset.make_batch``), and with torch's automatic dynamic shapes the first bucket compiles a
  graph of its own and the second one a graph with symbolic sizes that serves all later buckets (an odd
  size can add one more), so a run compiles two or three graphs however many buckets it has, where it
  compiled one per bucket and short last batch before. The generated code is cached on disk
  (:func:`compile_cache_dir`), so a later run with the same model, rank and shapes skips code
  generation. Errors of the compiled step, at compile or at run time, propagate to the trainer, which
  drops the compiled callables (:meth:`Compiled.drop`) and redoes that optimizer step eagerly from the
  same random numbers (:class:`StepRandom`). Noise and timesteps are drawn outside the compiled part,
  so the compiled and the eager step see the same random numbers.
* :class:`CaptionCache` encodes every caption once when no text-encoder LoRA is trained and captions are
  not shuffled; then the text encoders, and the VAE once latents are cached, leave the GPU until sample
  images need them (:func:`models_on`).
* Nothing in a step waits for the GPU: batches go to the device from pinned memory without blocking
  (:func:`training.devices.to_device`), and losses stay on the device (:class:`LossLog`) until the epoch's log line.

``LORA_SEARCH_EAGER=1`` in the environment turns all of this off (no compile, no caption cache, models
stay on the device): the plain step, to compare against or to rule the fast path out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from training.devices import autocast
from training.models import encode_captions, sdxl_time_ids

log = logging.getLogger(__name__)

EAGER_ENV = "LORA_SEARCH_EAGER"
# Distinct batch shapes a run may compile (buckets times batch sizes); torch's default of 8 would silently
# drop a many-bucket run back to eager.
RECOMPILE_LIMIT = 64


def eager_forced() -> bool:
    """Whether ``LORA_SEARCH_EAGER`` asks for the plain step."""
    return os.environ.get(EAGER_ENV, "").strip().lower() not in ("", "0", "false", "no")


def cache_root() -> Path:
    """lora-search's cache folder: ``$LORA_SEARCH_CACHE`` or ``~/.cache/lora-search``."""
    return Path(os.environ.get("LORA_SEARCH_CACHE") or Path.home() / ".cache" / "lora-search")


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else ``<cache_root>/torch_compile``."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_root() / "torch_compile")


def should_compile(torch_compile: Optional[bool], device: torch.device) -> bool:
    """The config's ``torch_compile`` resolved for ``device`` (unset: CUDA only), unless eager is forced."""
    if eager_forced():
        return False
    return device.type == "cuda" if torch_compile is None else bool(torch_compile)


def configure_cuda() -> None:
    """Let cuDNN pick the fastest convolution per shape and float32 matmuls use TF32 (bf16/fp16 are unaffected)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# --- the compiled UNet step ----------------------------------------------------------------------------

class Compiled:
    """``fn`` through ``torch.compile`` when asked; ``fn`` itself from the start, or for good after :meth:`drop`.

    Errors of the compiled call (compiling, running, replaying a CUDA graph) propagate: the trainer
    decides what to redo (``training.trainer``'s run-time fallback). ``name`` is for the log. Outputs under
    CUDA graphs live in memory the next step reuses: call :func:`begin_step` before each step, and keep
    copies (as :class:`LossLog` does) of what must outlive it.
    """

    def __init__(self, fn: Any, name: str, device: torch.device, compile: bool = False,
                 backend: Any = "inductor") -> None:
        self.fn, self.name, self.device, self.backend = fn, name, device, backend
        self.cuda_graphs = compile and device.type == "cuda" and backend in ("inductor", "cudagraphs")
        self._compiled = None
        self._shapes: set[tuple] = set()
        self.compiles: list[dict] = []  # per compilation: input shape, seconds of that call, graphs, cache hits/misses
        if compile:
            _prepare_dynamo()
            mode = "reduce-overhead" if self.cuda_graphs and backend == "inductor" else None
            # dynamic=None is torch's automatic dynamic shapes: the first input shape compiles a static graph,
            # a second one a graph whose changed sizes are symbols, which then serves every later bucket.
            self._compiled = torch.compile(fn, backend=backend, mode=mode, dynamic=None)

    @property
    def compiled(self) -> bool:
        """Whether calls go through ``torch.compile`` (False from the start, or after :meth:`drop`)."""
        return self._compiled is not None

    @property
    def compile_seconds(self) -> float:
        """Seconds of the calls that compiled a graph so far (a graph's first call pays its compilation)."""
        return sum(entry["seconds"] for entry in self.compiles)

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            return self.fn(*args)
        shapes = _shapes_of(args)
        started, before = time.perf_counter(), _cache_counts()
        with _eager_backward_lowering():
            out = self._compiled(*args)
        if shapes not in self._shapes:
            self._shapes.add(shapes)
            if _cache_counts()["graphs"] > before["graphs"]:  # else an earlier (dynamic) graph took the shape
                self._note_compile(shapes, time.perf_counter() - started, before)
        return out

    def drop(self) -> None:
        """Call ``fn`` itself from now on: the compiled version failed (the trainer logs why)."""
        self._compiled = None
        self.cuda_graphs = False

    def _note_compile(self, shapes: tuple, seconds: float, before: dict[str, int]) -> None:
        after = _cache_counts()
        entry = {"shape": list(shapes[0]) if shapes else [], "seconds": round(seconds, 2),
                 **{key: after[key] - before[key] for key in after}}
        self.compiles.append(entry)
        log.info("%s compiled for input %s in %.1f s (compiled-graph cache: %d hits, %d misses)", self.name,
                 "x".join(map(str, entry["shape"])), seconds, entry["cache_hits"], entry["cache_misses"])


class UnetLoss(Compiled):
    """``(noisy, timesteps, hidden, added, target, weights) -> loss``: the UNet forward and its MSE.

    ``weights`` are per-sample loss weights (0 for a padded batch's filler rows, times min-SNR's) or None.
    The loss is a 0-dim float32 tensor.
    """

    def __init__(self, unet: torch.nn.Module, autocast_dtype: Optional[torch.dtype], device: torch.device,
                 compile: bool = False, backend: Any = "inductor") -> None:
        self.unet, self.autocast_dtype = unet, autocast_dtype
        super().__init__(self.eager, "UNet step", device, compile, backend)

    def eager(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, added: Optional[dict],
              target: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """The step's forward and loss, run as plain PyTorch."""
        with autocast(self.device, self.autocast_dtype):
            pred = self.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if weights is not None:
            loss = loss * weights
        return loss.mean()


def begin_step(calls: Iterable[Optional[Compiled]]) -> None:
    """Before a step's first compiled call: tell CUDA graphs that the previous step's outputs are done with."""
    if any(c is not None and c.compiled and c.cuda_graphs for c in calls):
        torch.compiler.cudagraph_mark_step_begin()


def release_compiled() -> None:
    """Drop every compiled graph (and CUDA graph) of this process, so the next run starts clean."""
    import torch._dynamo

    torch._dynamo.reset()


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or an error whose message says the device ran out of memory (cuDNN, cuBLAS)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure_cause(exc: BaseException) -> str:
    """``Type: first line`` of the error underneath torch's wrappers (a compiler's own error), for one log line."""
    cause = exc
    while getattr(cause, "inner_exception", None) is not None:
        cause = cause.inner_exception
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {first}"


class StepRandom:
    """The torch random streams a training step draws from (CPU, and the run's GPU), to draw the same again.

    Capturing is a host-side copy of the generators' states: it does not wait for the GPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        """Put the streams back where they were at capture."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _prepare_dynamo() -> None:
    import torch._dynamo

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))


def _shapes_of(args: Any) -> tuple:
    """The shapes of every tensor in ``args`` (through lists, tuples and dicts), in order."""
    if isinstance(args, torch.Tensor):
        return (tuple(args.shape),)
    if isinstance(args, dict):
        args = list(args.values())
    if isinstance(args, (list, tuple)):
        return tuple(shape for item in args for shape in _shapes_of(item))
    return ()


def _eager_backward_lowering() -> Any:
    """Lower the backward pass with the forward, so that a compile error shows at the forward call, before
    any gradient exists (torch versions without the switch lower it at the first backward)."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


def _cache_counts() -> dict[str, int]:
    """torch's running counts of graphs compiled, and of compiled graphs found in / missing from the disk cache."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "cache_misses": counters["inductor"]["fxgraph_cache_miss"]}


# --- caption conditioning ------------------------------------------------------------------------------

class CaptionCache:
    """The frozen text encoders' conditioning of a fixed set of captions, computed once, on the device.

    :meth:`lookup` gives what ``training.models.encode_captions`` would: the hidden states and, for
    SDXL, the pooled embedding with the batch's size ids.
    """

    def __init__(self, models: Any, captions: Iterable[str], device: torch.device, clip_skip: Optional[int],
                 max_token_length: Optional[int], autocast_dtype: Optional[torch.dtype], chunk: int = 32) -> None:
        texts = sorted(set(captions))
        self.index = {text: i for i, text in enumerate(texts)}
        self.models, self.device = models, device
        self.clip_skip, self.max_token_length = clip_skip, max_token_length
        hidden, pooled = [], []
        with torch.no_grad(), autocast(device, autocast_dtype):
            for start in range(0, len(texts), chunk):
                h, added = encode_captions(models, texts[start:start + chunk], device, clip_skip, None,
                                           max_token_length)
                hidden.append(h)
                if added is not None:
                    pooled.append(added["text_embeds"])
        self.hidden = torch.cat(hidden) if hidden else None
        self.pooled = torch.cat(pooled) if pooled else None
        self.misses = 0

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, captions: list[str], batch: Any) -> tuple[torch.Tensor, Optional[dict]]:
        """Conditioning for ``captions`` (and ``batch``'s SDXL size ids), without running a text encoder."""
        if any(text not in self.index for text in captions):
            return self._encode_missing(captions, batch)
        rows = [self.index[text] for text in captions]
        # Python-int slices are views: no index tensor to copy to the device, so no wait for the GPU.
        hidden = torch.cat([self.hidden[i:i + 1] for i in rows])
        if self.pooled is None:
            return hidden, None
        pooled = torch.cat([self.pooled[i:i + 1] for i in rows])
        return hidden, {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch, len(rows), self.models, self.device)}

    def _encode_missing(self, captions: list[str], batch: Any) -> tuple[torch.Tensor, Optional[dict]]:
        # Every caption of the dataset is cached up front; this only guards against a caption rule changing.
        self.misses += 1
        if self.misses == 1:
            log.warning("a caption outside the text-embedding cache; encoding it where the text encoder is")
        te_device = next(self.models.text_encoders[0].parameters()).device
        with torch.no_grad():
            hidden, added = encode_captions(self.models, captions, te_device, self.clip_skip, batch,
                                            self.max_token_length)
        if added is not None:
            added = {k: v.to(self.device) for k, v in added.items()}
        return hidden.to(self.device), added


@contextlib.contextmanager
def models_on(modules: list, device: torch.device) -> Iterator[None]:
    """Move ``modules`` that were offloaded to the CPU onto ``device`` for a block, and back after it."""
    moved = [m for m in modules if m is not None and next(m.parameters()).device.type != device.type]
    for module in moved:
        module.to(device)
    try:
        yield
    finally:
        for module in moved:
            module.to("cpu")
        if moved and device.type == "cuda":
            torch.cuda.empty_cache()


# --- losses ----------------------------------------------------------------------------------------------

class LossLog:
    """Per-step losses of an epoch, kept on the device and read once (a single wait for the GPU)."""

    def __init__(self) -> None:
        self._micro: list[torch.Tensor] = []
        self._steps: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss (copied: a CUDA-graph output is overwritten by the next step)."""
        self._micro.append(loss.detach().float().clone())

    def discard_micro(self) -> None:
        """Forget the losses of the optimizer step in progress (it is being redone)."""
        self._micro = []

    def end_step(self) -> None:
        """Close an optimizer step: its loss is the mean of its micro-batches."""
        if self._micro:
            self._steps.append(torch.stack(self._micro).mean())
            self._micro = []

    def last(self, n: int) -> Optional[float]:
        """The mean of the last ``n`` step losses (waits for the GPU); None before the first step."""
        if not self._steps:
            return None
        return float(torch.stack(self._steps[-n:]).mean())

    def values(self) -> list[float]:
        """Every step loss so far, as floats."""
        return torch.stack(self._steps).tolist() if self._steps else []
