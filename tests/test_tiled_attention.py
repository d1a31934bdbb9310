"""The tiled attention (FlashAttention's online softmax in plain torch) against torch's fused
scaled_dot_product_attention, which we did not write, and the memory meter against sizes
known from the shapes."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llama3_mini.model import causal_mask, document_mask
from llama3_mini.tiled_attention import PeakMemory, peak_bytes, tiled_attention


def torch_attention(q, k, v, mask=None, causal=False):
    if causal:
        mask = causal_mask(q.shape[2], k.shape[2] - q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


@settings(max_examples=40, deadline=None)
@given(seq=st.integers(1, 40), past=st.integers(0, 9), n_kv=st.sampled_from([1, 2]),
       n_rep=st.sampled_from([1, 2, 3]), block_q=st.integers(1, 17), block_k=st.integers(1, 17),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_torchs_fused_attention(seq, past, n_kv, n_rep, block_q, block_k, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n_kv * n_rep, seq, 8, generator=g) * 3
    k = torch.randn(2, n_kv, seq + past, 8, generator=g) * 3
    v = torch.randn(2, n_kv, seq + past, 8, generator=g)
    ours = tiled_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    torch.testing.assert_close(ours, torch_attention(q, k, v, causal=causal),
                               atol=2e-5, rtol=2e-5)


def test_document_mask_and_its_skipped_tiles():
    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 16 + [1] * 16 + [2] * 32])  # three packed documents
    mask = document_mask(doc_ids)
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    stats = {}
    ours = tiled_attention(q, k, v, mask=mask, block_q=16, block_k=16, stats=stats)
    torch.testing.assert_close(ours, torch_attention(q, k, v, mask=mask), atol=2e-5, rtol=2e-5)
    # 16 tiles of 16 x 16; the mask keeps the diagonal tiles (4) and the one tile below the
    # diagonal inside document 2 (rows 48-63, keys 32-47): 5 computed, 11 hidden.
    assert stats == {"computed": 5, "skipped": 11}


@pytest.mark.parametrize("n_tiles", [1, 4, 7])
def test_causal_skips_the_tiles_above_the_diagonal(n_tiles):
    q = k = v = torch.randn(1, 1, 8 * n_tiles, 4)
    stats = {}
    tiled_attention(q, k, v, causal=True, block_q=8, block_k=8, stats=stats)
    assert stats == {"computed": n_tiles * (n_tiles + 1) // 2,
                     "skipped": n_tiles * (n_tiles - 1) // 2}


def test_a_large_score_arriving_late_is_rescaled_not_overflowed():
    # Scores of 1000 overflow exp() in float32 unless the running maximum is subtracted; the
    # largest arrives in the last tile, so every earlier sum must be rescaled.
    q = torch.ones(1, 1, 1, 1) * 100  # head_dim 1: the scores are q * k, 100 ... 1000
    k = torch.arange(1.0, 11.0).view(1, 1, 10, 1)
    v = torch.randn(1, 1, 10, 3)
    ours = tiled_attention(q, k, v, block_k=3)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, torch_attention(q, k, v))


def test_bfloat16_inputs_accumulate_in_float32():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 16).bfloat16() for _ in range(3))
    ours = tiled_attention(q, k, v, causal=True, block_q=7, block_k=9)
    assert ours.dtype == torch.bfloat16
    reference = torch_attention(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(ours.float(), reference, atol=1e-2, rtol=1e-2)


def test_bad_shapes_are_named():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match=r"q's heads \(3\) must be a multiple of k's heads"):
        tiled_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"v \(1, 1, 5, 8\) \(batch, n_kv_heads, total"):
        tiled_attention(q, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8))
    with pytest.raises(ValueError, match="block sizes must be positive"):
        tiled_attention(q, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), block_q=0)


def test_peak_memory_counts_what_is_alive_together():
    with PeakMemory() as meter:
        a = torch.ones(1024)  # 4 KiB
        b = a * 2  # 4 KiB more while a lives
        del a, b
        c = torch.ones(256)  # 1 KiB, after both were freed
    assert meter.peak == 8192
    assert meter.now == c.untyped_storage().nbytes() == 1024


def explicit_attention(q, k, v, mask):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask
    return torch.softmax(scores, dim=-1) @ v


def test_the_explicit_scores_grow_as_the_square_and_the_tiles_do_not():
    heads, dim = 2, 16
    explicit_peaks, tiled_peaks = [], []
    for seq in (256, 512, 1024):
        q = k = v = torch.randn(1, heads, seq, dim)
        scores = heads * seq * seq * 4  # one float32 (seq, seq) matrix per head

        explicit_peaks.append(peak_bytes(explicit_attention, q, k, v, causal_mask(seq)))
        tiled_peaks.append(peak_bytes(tiled_attention, q, k, v, causal=True))
        assert explicit_peaks[-1] >= 2 * scores  # the scores and the weights, together
        assert tiled_peaks[-1] < scores / 2
    for small, large in zip(explicit_peaks, explicit_peaks[1:], strict=False):
        assert large / small > 3.5  # twice the sequence, four times the memory
    for small, large in zip(tiled_peaks, tiled_peaks[1:], strict=False):
        assert large / small < 2.5  # twice the sequence, about twice the memory
