"""UNet: shapes on several image sizes, labels / null class, float64, zero init, errors."""

from __future__ import annotations

import pytest
import torch

from scoresde import VPSDE, DSMLoss, ScoreModel, UNet
from scoresde.nets import num_parameters


@pytest.mark.parametrize("size", [8, 16, 28, 32])
def test_output_shape_matches_input_for_several_sizes(size: int) -> None:
    torch.manual_seed(0)
    net = UNet(in_channels=1)
    torch.nn.init.normal_(net.out.weight, std=0.1)  # non-zero output to check the shape path
    x = torch.randn(2, 1, size, size)
    out = net(x, torch.rand(2))
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_non_square_rgb_and_three_levels() -> None:
    net = UNet(in_channels=3, channels=(16, 32, 32), attention_levels=(1, 2), num_res_blocks=2)
    x = torch.randn(2, 3, 12, 20)
    assert net(x, 0.5).shape == x.shape  # a float time is broadcast


def test_default_size_and_zero_initial_output() -> None:
    net = UNet()
    assert 100_000 < num_parameters(net) < 700_000
    assert torch.equal(net(torch.randn(3, 1, 8, 8), torch.rand(3)), torch.zeros(3, 1, 8, 8))


def test_labels_change_the_output_and_null_class_is_the_default() -> None:
    torch.manual_seed(0)
    net = UNet(num_classes=10)
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x = torch.randn(4, 1, 8, 8)
    t = torch.rand(4)
    y = torch.tensor([0, 1, 2, 3])
    out_y = net(x, t, y)
    out_null = net(x, t, torch.full((4,), 10))
    assert not torch.allclose(out_y, out_null)
    assert torch.equal(net(x, t), out_null)  # y=None means the null class
    with pytest.raises(ValueError, match="num_classes=None"):
        UNet()(x, t, y)


def test_float64_and_gradients_through_a_loss() -> None:
    sde = VPSDE()
    model = ScoreModel(UNet(channels=(8, 16)).double(), sde)
    x0 = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    loss = DSMLoss(sde)(model, x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float64
    assert model.net.out.weight.grad.abs().sum() > 0


def test_batch_elements_are_independent() -> None:
    """No cross-sample mixing (GroupNorm normalises per sample)."""
    torch.manual_seed(1)
    net = UNet(channels=(8, 16))
    torch.nn.init.normal_(net.out.weight, std=0.1)
    x = torch.randn(3, 1, 8, 8)
    t = torch.rand(3)
    torch.testing.assert_close(net(x, t)[1:2], net(x[1:2], t[1:2]), rtol=1e-5, atol=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="channels"):
        UNet(channels=())
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(channels=(8, 16), attention_levels=(2,))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        UNet()(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        UNet()(torch.randn(2, 64), torch.rand(2))
