"""The oneDNN inference path of the linear layers: same numbers, same RNG, autograd untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanpy_scvi.nn._layers import ONEDNN_MIN_MACS, Linear, _onednn_linear_works, linear


def _layer(n_in: int, n_out: int) -> Linear:
    torch.manual_seed(0)
    return Linear(n_in, n_out)


def test_inference_matches_float64_reference():
    layer = _layer(128, 2000)  # a decoder head: 256 x 128 x 2000 multiply-adds, above the threshold
    x = torch.relu(torch.randn(256, 128))
    with torch.inference_mode():
        out = layer(x)
    exact = x.double() @ layer.weight.double().T + layer.bias.double()
    assert out.dtype == torch.float32 and out.shape == (256, 2000)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_training_path_is_torch_linear():
    layer = _layer(128, 2000)
    x = torch.randn(256, 128, requires_grad=True)
    out = layer(x)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_frozen_weights_get_no_gradient():
    layer = _layer(2000, 128)  # an encoder input layer, as in reference mapping with frozen weights
    layer.requires_grad_(False)
    x = torch.randn(256, 2000, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(256, -1), rtol=1e-5, atol=1e-5)


def test_small_products_use_torch_linear():
    layer = _layer(10, 128)
    x = torch.randn(64, 10)
    assert x.shape[0] * layer.weight.numel() < ONEDNN_MIN_MACS
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
        y = torch.randn(3, 4, 10)  # 12 rows: still small
        torch.testing.assert_close(linear(y, layer.weight, layer.bias), F.linear(y, layer.weight, layer.bias))


def test_samples_by_cells_input_is_one_product():
    """(samples, cells, hidden) draws, as the expression queries decode them: same values as
    torch's linear, shape kept."""
    layer = _layer(128, 2000)
    x = torch.relu(torch.randn(5, 64, 128))
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (5, 64, 2000)
    exact = x.double() @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_capability_check_leaves_the_rng_alone():
    _onednn_linear_works.cache_clear()
    state = torch.get_rng_state()
    works = _onednn_linear_works()
    assert torch.equal(state, torch.get_rng_state())
    assert isinstance(works, bool)
    assert works == _onednn_linear_works()  # cached
