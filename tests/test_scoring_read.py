"""The reader's NaN/Inf check on the cold scoring path (lora_file._all_finite uses aminmax, not isfinite().all()):
every position, every float dtype the files use, sizes around vector widths and torch's parallel grain size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klora_ext import lora_file, synthetic
from klora_ext.errors import KLoraError
from klora_ext.lora_file import parse_state_dict

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BAD = (float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_position_of_small_tensors(dtype: torch.dtype) -> None:
    for n in (1, 2, 7, 16, 31, 33, 64, 65):
        base = torch.linspace(-3, 3, n, dtype=torch.float64).to(dtype)
        assert lora_file._all_finite(base)
        for pos in range(n):
            for bad in BAD:
                x = base.clone()
                x[pos] = bad
                assert not np.isfinite(x.double().numpy()).all()  # the independent check agrees it is bad
                assert not lora_file._all_finite(x), (n, pos, bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensors_with_threads(dtype: torch.dtype) -> None:
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(3)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            base = torch.randn(70_007, generator=gen).to(dtype).reshape(7, 10_001)
            assert lora_file._all_finite(base)
            big = torch.full((4,), 6e4 if dtype == torch.float16 else 1e30, dtype=dtype)
            assert lora_file._all_finite(big)  # large but finite
            for pos in (0, 1, 32_767, 32_768, 32_769, 50_000, 70_006):
                for bad in BAD:
                    x = base.clone()
                    x.view(-1)[pos] = bad
                    assert not lora_file._all_finite(x), (threads, pos, bad)
    finally:
        torch.set_num_threads(before)


def test_a_nan_in_a_file_tensor_is_refused_with_the_key() -> None:
    layers = synthetic.layer_shapes("tiny", "transformer")
    sd = synthetic.make_lora_state_dict(layers, 2, seed=4, dtype=torch.float16)
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[3]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[-1] = float("inf")
    with pytest.raises(KLoraError, match=rf"\[K-LoRA\] .*key {key} contains NaN/Inf values"):
        parse_state_dict(sd, name="bad")
