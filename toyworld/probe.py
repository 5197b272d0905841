"""What the toy models know, measured: zero-shot recognition with the toy CLIP, and base-model samples.

``recognise`` names the object (colour and shape), background and position of each image by the toy
CLIP's nearest caption among the world's options, the way CLIP zero-shot classification works.
``base_samples`` draws prompts with the committed base model, loaded by the trainer's own loader and
sampled by its own pipeline, so the check covers the path a user's checkpoint takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from toyworld import world


@dataclass(frozen=True)
class Accuracy:
    """Fraction of images whose tag the toy CLIP names right, per tag, and the chance level of each."""

    object: float
    background: float
    position: float
    chance: dict[str, float]

    def __str__(self) -> str:
        return ", ".join(f"{tag} {getattr(self, tag):.2f} (chance {self.chance[tag]:.2f})"
                         for tag in ("object", "background", "position"))


def tag_options(held_out: bool = False) -> dict[str, list[str]]:
    """Every caption each tag can take; without ``held_out`` the base model's world only."""
    shapes = [s for s in world.SHAPES if held_out or s != world.HELD_OUT_SHAPE]
    colors = [c for c in world.COLORS if held_out or c != world.HELD_OUT_COLOR]
    return {"object": [f"{c} {s}" for c in colors for s in shapes],
            "background": [f"{b} background" for b in world.BACKGROUNDS],
            "position": list(world.POSITIONS)}


def recognise(clip: Any, images: Sequence[Any], held_out: bool = False) -> list[dict[str, str]]:
    """Per image, the option of each tag whose caption embedding is nearest to the image's."""
    options = tag_options(held_out)
    embedded = clip.encode_images(list(images))
    found: list[dict[str, str]] = [{} for _ in images]
    for tag, texts in options.items():
        best = (embedded @ clip.encode_texts(texts).T).argmax(dim=1)
        for row, index in zip(found, best.tolist()):
            row[tag] = texts[index]
    return found


def accuracy(clip: Any, images: Sequence[Any], scenes: Sequence[world.Scene], held_out: bool = False) -> Accuracy:
    """How often :func:`recognise` names each tag of ``scenes`` (what the images were asked to show)."""
    found = recognise(clip, images, held_out)
    hits = {tag: 0 for tag in ("object", "background", "position")}
    for row, scene in zip(found, scenes):
        for tag in hits:
            hits[tag] += row[tag] == scene.caption((tag,))
    chance = {tag: 1 / len(texts) for tag, texts in tag_options(held_out).items()}
    return Accuracy(**{tag: n / len(scenes) for tag, n in hits.items()}, chance=chance)


def probe_scenes(count: int, seed: int = 123) -> list[world.Scene]:
    """Scenes of the base model's world (nothing held out), for prompting it."""
    import random

    rng = random.Random(seed)
    return [world.random_scene(rng, held_out=False) for _ in range(count)]


def base_samples(model: str | Path, prompts: Sequence[str], steps: int = 16, scale: float = 5.0,
                 seed: int = 0) -> list[Any]:
    """One image per prompt from the base model at ``model``, through the trainer's loader and pipeline."""
    import torch

    from training.config import config_from_dict
    from training.models import load_models
    from training.sampling import build_pipeline, make_scheduler

    models = load_models(config_from_dict({"pretrained_model_name_or_path": str(model)}, "toy world probe"))
    pipe = build_pipeline(models, make_scheduler("euler", models.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator().manual_seed(seed + i)
            images.append(pipe(prompt, width=world.SIZE, height=world.SIZE, num_inference_steps=steps,
                               guidance_scale=scale, generator=generator).images[0])
    return images


def dit_samples(model: str | Path, prompts: Sequence[str], steps: int = 16, scale: float = 5.0,
                seed: int = 0, t5_tokens: int = 256) -> list[Any]:
    """One image per prompt from the SD3 model folder ``model``, loaded and sampled by the trainer's family
    (with ``t5_tokens`` caption tokens of T5, as ``t5xxl_max_token_length`` sets them in training)."""
    import torch

    from training.dit import SD3Family

    fam = SD3Family(t5_max_length=t5_tokens)
    pipe = fam.load(model)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return [fam.sample(pipe, prompt, width=world.SIZE, height=world.SIZE, steps=steps, cfg_scale=scale,
                           seed=seed + i) for i, prompt in enumerate(prompts)]


def calibrate(clip: Any, references: Sequence[Any], style_images: Sequence[Any], seed: int = 321,
              count: int = 48) -> dict[str, dict[str, float]]:
    """Evaluator bounds for the toy CLIP, anchored the way the shipped ones are for ViT-L/14.

    ``low`` is what images of other subjects score (other shapes and colours, the same backgrounds and
    positions), ``high`` what fresh images of the character score, so a LoRA that draws the character
    as well as the dataset does scores about 1 and the base model about 0. Prompt adherence is anchored
    on the CLIP-T of drawn scenes with another scene's caption (low) and their own (high), pose variety on
    twice the spread of the character's own images (real photos of one subject give ~0.12 with ViT-L/14,
    where ``full_at`` is 0.25).
    """
    import random

    import torch

    from evaluation.components import centre_crop

    rng = random.Random(seed)
    color, shape = world.CHARACTER
    others = [s for s in (world.random_scene(rng) for _ in range(4 * count)) if (s.color, s.shape) != (color, shape)]
    others = others[:count]
    mine = [world.Scene(shape, color, s.background, s.position) for s in others
            if not world.clashes(color, s.background)]
    other_images = [world.draw(s, rng) for s in others]
    mine_images = [world.draw(s, rng) for s in mine]
    refs = clip.encode_images(list(references))
    style = torch.nn.functional.normalize(clip.encode_images(list(style_images)).mean(dim=0), dim=0)
    emb_other, emb_mine = clip.encode_images(other_images), clip.encode_images(mine_images)
    prompts = [s.caption(("background", "position")) for s in others]
    texts = clip.encode_texts(prompts)
    own = (emb_other * texts).sum(dim=1)
    shifted = (emb_other * texts.roll(1, dims=0)).sum(dim=1)
    crops = clip.encode_images([centre_crop(im, 0.6) for im in mine_images])
    spread = 1.0 - (crops @ crops.T)[~torch.eye(len(crops), dtype=torch.bool)].mean()

    def mean(t: Any) -> float:
        return round(float(t.mean()), 3)

    return {"identity": {"low": mean(emb_other @ refs.T), "high": mean(emb_mine @ refs.T)},
            "style": {"low": mean(emb_other @ style), "high": mean(emb_mine @ style)},
            "prompt_adherence": {"low": mean(shifted), "high": mean(own)},
            "pose_variety": {"full_at": round(2 * float(spread), 3)}}
