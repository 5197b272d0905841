"""Evaluator settings (strict TOML) and offline CLIP loading errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evaluation.clip_loader import load_clip
from evaluation.settings import ClipSettings, EvaluatorSettings, load_settings, settings_from_dict
from tiny_clip import TINY_NAME, pattern_image, populate_hub_cache
from training.errors import ConfigError, LoraSearchError

PROJECT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "evaluator.toml"


def test_shipped_config_loads_with_documented_defaults():
    settings = load_settings(PROJECT_CONFIG)
    assert settings.weights.as_dict() == {"identity": 0.40, "pose_variety": 0.20, "style": 0.20,
                                          "prompt_adherence": 0.10, "technical": 0.10}
    assert settings == EvaluatorSettings()  # the file and the dataclass defaults agree
    assert settings.prompt_adherence.low == 0.15 and settings.prompt_adherence.high == 0.35


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    path = tmp_path / "evaluator.toml"
    path.write_text("[weights]\nidentiy = 0.4\n")
    with pytest.raises(ConfigError, match="unknown key 'identiy'; did you mean 'identity'"):
        load_settings(path)
    with pytest.raises(ConfigError, match="did you mean 'references'"):
        settings_from_dict({"referencs": "x"})


def test_weights_must_be_non_negative_and_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 0.9"):
        settings_from_dict({"weights": {"identity": 0.3}})
    with pytest.raises(ConfigError, match="technical = -0.1"):
        settings_from_dict({"weights": {"identity": 0.6, "technical": -0.1}})
    ok = settings_from_dict({"weights": {"identity": 0.5, "pose_variety": 0.0, "style": 0.2,
                                         "prompt_adherence": 0.2, "technical": 0.1}})
    assert ok.weights.identity == 0.5


def test_bad_values_and_types_are_named():
    with pytest.raises(ConfigError, match="aggregation = 'median'"):
        settings_from_dict({"identity": {"aggregation": "median"}})
    with pytest.raises(ConfigError, match="top_k = 'three': write a whole number"):
        settings_from_dict({"identity": {"top_k": "three"}})
    with pytest.raises(ConfigError, match=r"low = 0.4 must be below high = 0.3"):
        settings_from_dict({"prompt_adherence": {"low": 0.4, "high": 0.3}})
    with pytest.raises(ConfigError, match="must be a \\[clip\\] table"):
        settings_from_dict({"clip": "ViT-B-32"})


def test_command_line_overrides_replace_only_what_is_given():
    base = EvaluatorSettings()
    new = base.with_overrides(clip_model="local-dir:/x", clip_pretrained=None, references="refs")
    assert (new.clip.model, new.clip.pretrained, new.references) == ("local-dir:/x", base.clip.pretrained, "refs")
    assert base.clip.model == "ViT-L-14-quickgelu"


def test_missing_weights_file_says_what_to_download_and_where(tmp_path):
    target = tmp_path / "clip" / "ViT-L-14-openai.safetensors"
    with pytest.raises(LoraSearchError) as info:
        load_clip(ClipSettings(model="ViT-L-14-quickgelu", pretrained=str(target)))
    message = str(info.value)
    assert "\n" not in message
    assert "huggingface.co/timm/vit_large_patch14_clip_224.openai" in message and str(target) in message


def test_hub_only_and_uncached_names_fail_without_network(tmp_path):
    with pytest.raises(LoraSearchError, match="local-dir:FOLDER"):
        load_clip(ClipSettings(model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", pretrained=""))
    with pytest.raises(LoraSearchError, match="pretrained tag 'laion2b_s34b_b79k' needs a populated cache"):
        load_clip(ClipSettings(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    with pytest.raises(LoraSearchError, match="is not in the cache .*huggingface.co/laion/CLIP-ViT-B-32"):
        load_clip(ClipSettings(model="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(empty_cache)))
    with pytest.raises(LoraSearchError, match="is not in the cache .*local-dir:FOLDER"):
        load_clip(ClipSettings(model="hf-hub:someone/missing", pretrained="", cache_dir=str(empty_cache)))
    with pytest.raises(LoraSearchError, match="did you mean 'ViT-B-32'"):
        load_clip(ClipSettings(model="ViT-B-23", pretrained="x.safetensors"))


def test_local_dir_problems_are_named(tmp_path):
    with pytest.raises(LoraSearchError, match="CLIP folder .* not found"):
        load_clip(ClipSettings(model=f"local-dir:{tmp_path / 'nope'}"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "open_clip_config.json").write_text("{}")
    with pytest.raises(LoraSearchError, match="has no weights file"):
        load_clip(ClipSettings(model=f"local-dir:{tmp_path / 'half'}"))


def test_bad_weights_file_gives_one_clear_line(tiny_clip_dir, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(LoraSearchError, match="could not load CLIP") as info:
        load_clip(ClipSettings(model=TINY_NAME, pretrained=str(bad)))
    assert "\n" not in str(info.value)


def test_local_dir_and_weights_file_load_the_same_model_offline(tiny_clip_dir, monkeypatch):
    import open_clip

    seen = []
    original = open_clip.create_model_and_transforms

    def spy(*args, **kwargs):
        import huggingface_hub.constants

        seen.append((os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE))
        return original(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from_dir = load_clip(ClipSettings(model=f"local-dir:{tiny_clip_dir}", pretrained=""))
    from_file = load_clip(ClipSettings(model=TINY_NAME, pretrained=str(tiny_clip_dir / "open_clip_model.safetensors")))
    import huggingface_hub.constants

    assert seen == [("1", True), ("1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE is False
    image = [pattern_image(3)]
    a, b = from_dir.encode_images(image), from_file.encode_images(image)
    assert a.shape == (1, 64) and float((a - b).abs().max()) < 1e-6
    assert abs(float(a.norm()) - 1.0) < 1e-5


def test_populated_cache_loads_offline(tiny_clip_dir, tmp_path):
    name = populate_hub_cache(tmp_path / "cache", tiny_clip_dir)
    cached = load_clip(ClipSettings(model=name, pretrained="", cache_dir=str(tmp_path / "cache")))
    local = load_clip(ClipSettings(model=f"local-dir:{tiny_clip_dir}"))
    image = [pattern_image(5)]
    assert float((cached.encode_images(image) - local.encode_images(image)).abs().max()) < 1e-6
