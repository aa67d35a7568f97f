import math

import pytest
import torch
import torch.nn.functional as F

from subfit_kernels import decode_attention, decode_attention_reference

# (batch, q heads, kv heads, head dim, cache length, num_splits)
SHAPES = [
    (1, 4, 4, 16, 33, None),
    (3, 6, 2, 32, 150, None),
    (3, 9, 3, 64, 200, 3),
    (2, 8, 1, 64, 70, 1),
    (4, 4, 2, 24, 100, 64),
]


def make(shape, dtype, device, poison_tail=True):
    batch, hq, hkv, head_dim, cache_len, _ = shape
    q = torch.randn(batch, hq, head_dim, dtype=dtype, device=device)
    k_cache = torch.randn(batch, hkv, cache_len, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn(batch, hkv, cache_len, head_dim, dtype=dtype, device=device)
    lengths = [cache_len, 1, 0, cache_len // 2 + 3][:batch]  # full, single, empty, partial
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    if poison_tail:  # positions past a sequence's length must never be read
        for b, n in enumerate(lengths):
            k_cache[b, :, n:] = float("nan")
            v_cache[b, :, n:] = float("nan")
    return q, k_cache, v_cache, seq_lens


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device, poison, references, assert_close):
    q, k_cache, v_cache, seq_lens = make(shape, dtype, device)
    ref32, ref_lowp = references(decode_attention_reference, q, k_cache, v_cache, seq_lens)
    out = poison(q.shape, dtype, device)
    assert decode_attention(q, k_cache, v_cache, seq_lens, num_splits=shape[-1], out=out, backend="triton") is out
    assert_close(out, ref32, ref_lowp)
    if shape[0] > 2:
        assert torch.equal(out[2], torch.zeros_like(out[2])), "an empty sequence attends to nothing"


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_split_count_does_not_change_the_result(num_splits, device):
    q, k_cache, v_cache, seq_lens = make((3, 6, 2, 32, 300, None), torch.float32, device)
    out = decode_attention(q, k_cache, v_cache, seq_lens, 0.3, num_splits=num_splits, backend="triton")
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, seq_lens, 0.3), rtol=1e-5, atol=1e-6)


def test_reference_is_sdpa_with_gqa(device):
    """The reference equals PyTorch's SDPA on the valid prefix, kv heads repeated per group (HF repeat_kv)."""
    q, k_cache, v_cache, seq_lens = make((2, 6, 2, 32, 40, None), torch.float32, device, poison_tail=False)
    ref = decode_attention_reference(q, k_cache, v_cache, seq_lens)
    n = int(seq_lens[1])
    k, v = (c[1:2, :, :n].repeat_interleave(3, dim=1) for c in (k_cache, v_cache))
    sdpa = F.scaled_dot_product_attention(q[1:2, :, None], k, v, scale=1 / math.sqrt(32))[:, :, 0]
    torch.testing.assert_close(ref[1:2], sdpa, rtol=1e-5, atol=1e-6)


def test_strided_cache_layout(device):
    """A cache stored [B, S, Hkv, D] and viewed as [B, Hkv, S, D] is read through its strides."""
    batch, hq, hkv, head_dim, cache_len = 2, 4, 2, 32, 90
    q = torch.randn(batch, hq, head_dim, device=device)
    k_cache = torch.randn(batch, cache_len, hkv, head_dim, device=device).transpose(1, 2)
    v_cache = torch.randn(batch, cache_len, hkv, head_dim, device=device).transpose(1, 2)
    seq_lens = torch.tensor([90, 41], dtype=torch.int64, device=device)
    out = decode_attention(q, k_cache, v_cache, seq_lens, backend="triton")
    ref = decode_attention_reference(q, k_cache.contiguous(), v_cache.contiguous(), seq_lens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("gqa", ValueError, r"q_heads \(6\) must be a positive multiple of kv_heads \(4\)"),
        ("head_dim", ValueError, r"k_cache has shape \(2, 2, 16, 8\); expected \[2, \*, \*, 16\]"),
        ("v_shape", ValueError, r"v_cache has shape \(2, 2, 12, 16\); expected \[2, 2, 16, 16\]"),
        ("dtype", TypeError, r"v_cache has dtype torch.float16; expected float32 \(the dtype of q\)"),
        ("seq_lens_dtype", TypeError, r"seq_lens has dtype torch.float32; expected int32 or int64"),
        ("seq_lens_shape", ValueError, r"seq_lens has shape \(3,\); expected \[2\]"),
        ("splits", ValueError, r"num_splits must be in 1..64"),
        ("cache_stride", ValueError, r"k_cache must have stride 1 in its last dim"),
        ("device", ValueError, r"one device.*seq_lens on meta"),
        ("q_rank", ValueError, r"q has shape \(2, 1, 6, 16\); expected \[\*, \*, \*\]"),
    ],
)
def test_launcher_errors(case, error, match):
    q, k_cache, v_cache, seq_lens = make((2, 6, 2, 16, 16, None), torch.float32, "cpu")
    args, kwargs = [q, k_cache, v_cache, seq_lens], {"backend": "triton"}
    if case == "gqa":
        args[1] = args[2] = torch.zeros(2, 4, 16, 16)
    elif case == "head_dim":
        args[1] = k_cache[..., :8]
    elif case == "v_shape":
        args[2] = v_cache[:, :, :12]
    elif case == "dtype":
        args[2] = v_cache.half()
    elif case == "seq_lens_dtype":
        args[3] = seq_lens.float()
    elif case == "seq_lens_shape":
        args[3] = torch.ones(3, dtype=torch.int32)
    elif case == "splits":
        kwargs["num_splits"] = 65
    elif case == "cache_stride":
        args[1] = args[2] = torch.zeros(2, 2, 16, 16).transpose(2, 3)
    elif case == "device":
        args[3] = seq_lens.to("meta")
    elif case == "q_rank":
        args[0] = q[:, None]
    with pytest.raises(error, match=match):
        decode_attention(*args, **kwargs)


def test_opcheck(device):
    q, k_cache, v_cache, seq_lens = make((2, 4, 2, 16, 20, None), torch.float32, device, poison_tail=False)
    for splits in (None, 2):
        args = (q, k_cache, v_cache, seq_lens, 0.25, splits, torch.empty_like(q))
        torch.library.opcheck(torch.ops.subfit.decode_attention.default, args)


def test_compiles_fullgraph(device):
    q, k_cache, v_cache, seq_lens = make((2, 4, 2, 16, 20, None), torch.float32, device, poison_tail=False)
    out = torch.compile(decode_attention, backend="aot_eager", fullgraph=True)(q, k_cache, v_cache, seq_lens)
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, seq_lens))
