"""The capturable eager mask (frameworks.hf.attention.eager_mask_capturable) equals transformers'
own eager_mask: same values and dtype, with and without a padding mask, for prefill and decode."""

import pytest
import torch
from transformers.masking_utils import eager_mask

from frameworks.hf.attention import eager_mask_capturable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [
    dict(batch_size=2, q_length=5, kv_length=9, q_offset=4),
    dict(batch_size=2, q_length=1, kv_length=7, q_offset=6,
         attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()),
])
def test_capturable_eager_mask_equals_stock(kw, dtype):
    stock, ours = eager_mask(dtype=dtype, **kw), eager_mask_capturable(dtype=dtype, **kw)
    assert ours.dtype == stock.dtype and ours.shape == stock.shape
    assert torch.equal(ours, stock)
    assert (ours == 0).any() and (ours == torch.finfo(dtype).min).any()  # both values occur
