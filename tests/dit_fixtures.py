"""Shared by the SD3/Z-Image test files: tiny models run fastest on one thread on a shared machine."""

import copy

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the test's torch work on one thread (tiny tensors gain nothing from more; a busy machine loses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def merged(base, deltas):
    """A copy of ``base`` with ``weight += delta`` for each module path: the LoRA formula, done by hand."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, delta in deltas.items():
            modules[path].weight += delta
    return model
