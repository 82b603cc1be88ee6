"""ConditionEncoder: shapes at any size, the zero-initialised output, translation equivariance in the
interior, a receptive field of a few codes that includes what lies below and to the right, and
argument errors naming the argument."""
import pytest
import torch
from torch import nn

import fastvq
from fastvq import ConditionEncoder
from helpers import assert_close


def encoder(in_channels=3, n_embd=8, factor=4, seed=0, hidden=16):
    """An encoder whose output projection is random (a fresh one outputs exactly zero)."""
    torch.manual_seed(seed)
    enc = ConditionEncoder(in_channels, n_embd, factor, hidden=hidden)
    nn.init.normal_(enc.out.weight, std=0.5)
    nn.init.normal_(enc.out.bias, std=0.5)
    return enc.eval()


@pytest.mark.parametrize("factor, size", [(1, (5, 7)), (2, (6, 10)), (4, (12, 20)), (16, (32, 48))])
def test_shapes_and_a_fresh_encoder_outputs_zero(factor, size):
    torch.manual_seed(factor)
    enc = ConditionEncoder(3, 8, factor)
    x = torch.randn(2, 3, *size)
    y = enc(x)
    assert y.shape == (2, 8, size[0] // factor, size[1] // factor)
    assert torch.equal(y, torch.zeros_like(y))  # the zero output projection
    y.sum().backward()  # ...which still gets a gradient, so training switches the path on
    assert enc.out.weight.grad.abs().max() > 0


def test_translation_equivariant_in_the_interior():
    f, m = 4, 4  # m: codes of margin, beyond the receptive field's reach into the zero padding
    enc = encoder(factor=f)
    x = torch.randn(1, 3, 20 * f, 24 * f)
    with torch.no_grad():
        whole = enc(x)
        shifted = enc(x[:, :, f:, 2 * f:])  # the map moved up one code and left two
    assert shifted.shape == (1, 8, 19, 22)
    assert_close(shifted[:, :, m:-m, m:-m], whole[:, :, 1 + m:-m, 2 + m:-m], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted[:, :, 0], whole[:, :, 1, 2:])  # the borders do see the padding


def test_each_code_sees_a_few_codes_around_it_below_and_right_included():
    f = 4
    enc = encoder(factor=f)
    x = torch.randn(1, 3, 16 * f, 16 * f)
    with torch.no_grad():
        base = enc(x)
        below_right = x.clone()
        below_right[:, :, 9 * f:10 * f, 9 * f:10 * f] += 1  # the pixels of code (9, 9)
        changed = (enc(below_right) - base).abs().amax(1)[0]  # (16, 16)
    assert changed[8, 8] > 0 and changed[7, 7] > 0  # codes above-left of the change see it
    assert changed[:5].max() == 0 and changed[:, :5].max() == 0  # a bounded receptive field


def test_bad_arguments():
    with pytest.raises(ValueError, match="factor must be a power of two"):
        ConditionEncoder(3, 8, 3)
    with pytest.raises(ValueError, match="factor must be an integer >= 1"):
        ConditionEncoder(3, 8, 0)
    with pytest.raises(ValueError, match="in_channels"):
        ConditionEncoder(0, 8, 2)
    enc = ConditionEncoder(3, 8, 4)
    with pytest.raises(ValueError, match="cond's height and width must be positive multiples of factor 4"):
        enc(torch.zeros(1, 3, 8, 10))
    with pytest.raises(ValueError, match=r"cond must be a \(B, 3, H, W\)"):
        enc(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        enc(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    assert fastvq.ConditionEncoder is ConditionEncoder
