"""TokenLayout slicing against hand-written index lists."""

import numpy as np
import pytest
import torch

from vsink.layout import TokenLayout


def test_dinov2_register_order():
    lay = TokenLayout(num_cls=1, num_registers=4, grid=(2, 3))
    assert lay.num_tokens == 11 and lay.num_prefix == 5
    assert lay.kinds() == ["cls"] + ["register"] * 4 + ["patch"] * 6
    x = torch.arange(11)[None, :, None]
    parts = lay.split(x)
    assert parts["cls"].flatten().tolist() == [0]
    assert parts["registers"].flatten().tolist() == [1, 2, 3, 4]
    assert parts["patches"].flatten().tolist() == [5, 6, 7, 8, 9, 10]
    assert lay.patch_grid(x)[0, :, :, 0].tolist() == [[5, 6, 7], [8, 9, 10]]
    assert lay.patch_position(9) == (1, 1) and lay.patch_token(1, 1) == 9
    assert lay.register_position == "after_cls"


def test_appended_registers_and_no_cls():
    lay = TokenLayout(num_cls=0, num_registers=0, grid=(2, 2)).with_appended(2)
    assert lay.kinds() == ["patch"] * 4 + ["register"] * 2
    assert lay.register_indices() == [4, 5] and lay.cls_indices() == []
    assert lay.register_position == "end"
    arr = np.arange(12).reshape(2, 6)
    assert lay.split(arr)["registers"].tolist() == [[4, 5], [10, 11]]
    assert lay.patches(arr).tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    both = TokenLayout(1, 4, (1, 1), num_appended=1)
    assert both.register_indices() == [1, 2, 3, 4, 6] and both.register_position == "after_cls+end"
    assert TokenLayout.from_dict(both.to_dict()) == both


def test_slicing_other_dims_and_errors():
    lay = TokenLayout(1, 0, (2, 2))
    attn = torch.rand(2, 3, 5, 5)
    assert lay.patch_grid(attn, dim=-1).shape == (2, 3, 5, 2, 2)
    assert torch.equal(lay.patches(attn, dim=2), attn[:, :, 1:])
    with pytest.raises(ValueError, match="layout expects 5"):
        lay.patches(torch.rand(2, 6, 4))
    with pytest.raises(ValueError, match="not a patch"):
        lay.patch_position(0)
    with pytest.raises(IndexError):
        lay.kind_of(5)
    with pytest.raises(ValueError):
        TokenLayout(-1, 0, (2, 2))


def test_appended_indices_follow_the_patches():
    lay = TokenLayout(num_cls=1, num_registers=4, grid=(2, 2), num_appended=2)
    assert lay.appended_indices() == [9, 10]
    assert lay.register_indices() == [1, 2, 3, 4, 9, 10]
    assert lay.kind_of(9) == "register" and lay.kind_of(8) == "patch"
