"""The Z-Image Turbo training adapter: merged at +1 for training, cancelled only while sampling."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from training.adapter import TrainingAdapter
from training.dit import SD3Family, ZImageFamily
from training.dit_lora import DitLora
from training.errors import LoraSearchError
from training.tiny_dit import build_tiny_zimage, tiny_zimage_transformer
from dit_fixtures import one_torch_thread  # noqa: F401  (autouse)

ZIMAGE = ZImageFamily()


def random_lora(model, seed, **kw):
    lora = DitLora(model, ZIMAGE, dim=4, **kw)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return lora


def adapter_file(tmp_path, base):
    """An adapter as ai-toolkit ships it: ``diffusion_model.*`` peft keys, no alpha (strength 1)."""
    lora = random_lora(copy.deepcopy(base), seed=5, alpha=4)
    tensors = {f"diffusion_model.{path}.lora_{ab}.weight": w.detach().clone()
               for path, (down, up) in lora.pairs().items() for ab, w in (("A", down), ("B", up))}
    path = tmp_path / "zimage_turbo_training_adapter.safetensors"
    save_file(tensors, str(path))
    return path, {path: up @ down for path, (down, up) in lora.pairs().items()}


def with_deltas(base, *deltas):
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for group in deltas:
            for path, delta in group.items():
                modules[path].weight += delta
    return model


def output(model):
    generator = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 8, 8, generator=generator)]
    with torch.no_grad():
        caption = [torch.randn(5, 16, generator=generator)]
        return torch.stack(model(x, torch.tensor([0.4]), caption, return_dict=False)[0])


def test_training_sees_turbo_plus_adapter_plus_lora_and_samples_see_turbo_plus_lora(tmp_path):
    turbo = tiny_zimage_transformer()
    path, adapter_deltas = adapter_file(tmp_path, turbo)
    model = copy.deepcopy(turbo)
    adapter = TrainingAdapter(model, ZIMAGE, path)
    adapter.merge()
    assert torch.allclose(output(model), output(with_deltas(turbo, adapter_deltas)), atol=1e-5)
    lora = random_lora(model, seed=6, alpha=8)
    lora_deltas = {p: lora.scale * up @ down for p, (down, up) in lora.pairs().items()}
    training_view = output(model)
    assert torch.allclose(training_view, output(with_deltas(turbo, adapter_deltas, lora_deltas)), atol=1e-5)
    with adapter.removed():
        assert torch.allclose(output(model), output(with_deltas(turbo, lora_deltas)), atol=1e-5)
    assert torch.equal(output(model), training_view)  # back to training, bit for bit


def test_samples_through_the_pipeline_drop_the_adapter(tmp_path):
    import numpy as np

    pipe = build_tiny_zimage()
    turbo = copy.deepcopy(pipe.transformer)
    path, _ = adapter_file(tmp_path, turbo)

    def sample():
        return np.asarray(ZIMAGE.sample(pipe, "sks dog", width=32, height=32, steps=2, turbo=True, seed=3))

    plain = sample()
    adapter = TrainingAdapter(pipe.transformer, ZIMAGE, path)
    adapter.merge()
    assert not np.array_equal(sample(), plain)
    with adapter.removed():
        assert np.abs(sample().astype(int) - plain.astype(int)).max() <= 1  # the turbo model's own sample


def test_an_adapter_for_another_model_is_refused(tmp_path):
    turbo = tiny_zimage_transformer()
    path, _ = adapter_file(tmp_path, turbo)
    other = ZImageFamily()
    small = copy.deepcopy(turbo)
    with pytest.raises(LoraSearchError, match="no sd3 LoRA keys"):
        TrainingAdapter(small, SD3Family(), path)
    bigger = tmp_path / "other.safetensors"
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 64),
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 4)}, str(bigger))
    with pytest.raises(LoraSearchError, match="layers.0.attention.to_q does not match a Linear"):
        TrainingAdapter(small, other, bigger)
    with pytest.raises(LoraSearchError, match="no such file"):
        TrainingAdapter(small, other, tmp_path / "missing.safetensors")
