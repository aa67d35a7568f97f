import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from subfit_kernels import apply_rope, apply_rope_reference

# (batch, tokens, q heads, kv heads, head dim, cache length)
SHAPES = [(1, 1, 4, 2, 16, 8), (2, 5, 3, 1, 32, 20), (2, 17, 6, 2, 64, 40), (1, 3, 9, 3, 24, 6)]
MAX_POS = 64


def tables(head_dim: int, device, rope_scaling=None):
    """Half tables from Hugging Face's own rotary embedding (llama3 scaling when asked)."""
    config = LlamaConfig(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4,
                         max_position_embeddings=MAX_POS, rope_scaling=rope_scaling)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(MAX_POS)[None])
    return cos[0, :, : head_dim // 2].to(device), sin[0, :, : head_dim // 2].to(device), cos[0], sin[0]


def make(shape, dtype, device):
    batch, tokens, hq, hkv, head_dim, cache_len = shape
    qkv = torch.randn(batch, tokens, (hq + 2 * hkv) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)  # views of a fused projection
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    # distinct slots per sequence, so fused cache writes never race
    positions = torch.stack([torch.randperm(cache_len, device=device)[:tokens] for _ in range(batch)])
    return q, k, v, positions


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_cache", [False, True], ids=["rope", "rope+cache"])
def test_matches_reference(shape, with_cache, dtype, device, poison, references, assert_close):
    batch, tokens, hq, hkv, head_dim, cache_len = shape
    q, k, v, positions = make(shape, dtype, device)
    cos, sin, _, _ = tables(head_dim, device)
    (q32, k32), (q_lowp, k_lowp) = references(apply_rope_reference, q, k, cos, sin, positions)
    caches = {}
    if with_cache:
        k_cache, v_cache = poison((batch, hkv, cache_len, head_dim), dtype, device), poison((batch, hkv, cache_len, head_dim), dtype, device)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        apply_rope_reference(q, k, cos, sin, positions, k_cache=k_ref, v_cache=v_ref, v=v)
        caches = dict(k_cache=k_cache, v_cache=v_cache, v=v)

    out = (poison(q.shape, dtype, device), poison(k.shape, dtype, device))
    q_rot, k_rot = apply_rope(q, k, cos, sin, positions, out=out, backend="triton", **caches)
    assert q_rot is out[0] and k_rot is out[1]
    assert_close(q_rot, q32, q_lowp)
    assert_close(k_rot, k32, k_lowp)
    if with_cache:  # written slots hold exactly the returned k and v; the rest stays untouched (NaN)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=tol, atol=tol)
        torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)
        b = torch.arange(batch, device=device)[:, None]
        assert torch.equal(k_cache[b, :, positions], k_rot)


def test_matches_hugging_face_llama3_scaling(device):
    """Same result as HF's apply_rotary_pos_emb with HF's (llama3-scaled) tables, [B, T, H, D] layout."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    q, k, _, positions = make((2, 5, 6, 2, 32, MAX_POS), torch.float32, device)
    cos, sin, cos_full, sin_full = tables(32, device, scaling)
    q_rot, k_rot = apply_rope(q, k, cos, sin, positions, backend="triton")
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_full[positions.cpu()].to(device),
                                      sin_full[positions.cpu()].to(device))
    torch.testing.assert_close(q_rot, q_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot, k_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_full_table_views_and_int32_positions(device):
    """Half views of HF's full [max_pos, D] tables are read with their row stride, no copy."""
    q, k, _, positions = make((1, 4, 2, 2, 16, MAX_POS), torch.float32, device)
    _, _, cos_full, sin_full = tables(16, device)
    cos_half, sin_half = cos_full.to(device)[:, :8], sin_full.to(device)[:, :8]
    assert not cos_half.is_contiguous()
    q_rot, k_rot = apply_rope(q, k, cos_half, sin_half, positions.int(), backend="triton")
    q_ref, k_ref = apply_rope_reference(q, k, cos_half.contiguous(), sin_half.contiguous(), positions)
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_rot, k_ref)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("odd_dim", ValueError, r"head_dim 15 must be even"),
        ("k_shape", ValueError, r"k has shape \(1, 2, 2, 8\); expected \[1, 2, \*, 16\]"),
        ("table_dtype", TypeError, r"cos has dtype torch.float16 but must be torch.float32"),
        ("table_shape", ValueError, r"cos has shape \(64, 16\); expected \[\*, 8\]"),
        ("positions_dtype", TypeError, r"positions has dtype torch.float32; expected int32 or int64"),
        ("positions_shape", ValueError, r"positions has shape \(2,\); expected \[1, 2\]"),
        ("partial_cache", ValueError, r"needs all of k_cache, v_cache and v"),
        ("cache_shape", ValueError, r"k_cache has shape \(1, 3, 8, 16\); expected \[1, 2, \*, 16\]"),
        ("cache_stride", ValueError, r"k_cache must have stride 1 in its last dim"),
        ("cache_dtype", TypeError, r"v_cache has dtype torch.float16; expected float32"),
        ("device", ValueError, r"one device.*sin on meta"),
    ],
)
def test_launcher_errors(case, error, match):
    q, k, v, positions = make((1, 2, 4, 2, 16, 8), torch.float32, "cpu")
    cos, sin, _, _ = tables(16, "cpu")
    args = [q, k, cos, sin, positions]
    kwargs = {"backend": "triton"}
    caches = dict(k_cache=torch.zeros(1, 2, 8, 16), v_cache=torch.zeros(1, 2, 8, 16), v=v)
    if case == "odd_dim":
        args[0] = torch.randn(1, 2, 4, 15)
    elif case == "k_shape":
        args[1] = k[..., :8]
    elif case == "table_dtype":
        args[2] = cos.half()
    elif case == "table_shape":
        args[2] = torch.randn(MAX_POS, 16)
    elif case == "positions_dtype":
        args[4] = positions.float()
    elif case == "positions_shape":
        args[4] = positions[0]
    elif case == "partial_cache":
        kwargs["k_cache"] = caches["k_cache"]
    elif case == "cache_shape":
        kwargs.update(caches, k_cache=torch.zeros(1, 3, 8, 16))
    elif case == "cache_stride":
        kwargs.update(caches, k_cache=torch.zeros(1, 2, 16, 8).transpose(2, 3))
    elif case == "cache_dtype":
        kwargs.update(caches, v_cache=caches["v_cache"].half())
    elif case == "device":
        args[3] = sin.to("meta")
    with pytest.raises(error, match=match):
        apply_rope(*args, **kwargs)


def test_opcheck(device):
    q, k, v, positions = make((2, 3, 4, 2, 16, 8), torch.float32, device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cos, sin, _, _ = tables(16, device)
    outs = (torch.empty_like(q), torch.empty_like(k))
    caches = (torch.zeros(2, 2, 8, 16, device=device), torch.zeros(2, 2, 8, 16, device=device))
    torch.library.opcheck(torch.ops.subfit.apply_rope.default, (q, k, cos, sin, positions, v, *outs, *caches))
    torch.library.opcheck(torch.ops.subfit.apply_rope.default, (q, k, cos, sin, positions, None, *outs, None, None))


def test_compiles_fullgraph(device):
    q, k, v, positions = make((1, 3, 4, 2, 16, 8), torch.float32, device)
    cos, sin, _, _ = tables(16, device)
    k_cache, v_cache = torch.zeros(1, 2, 8, 16, device=device), torch.zeros(1, 2, 8, 16, device=device)

    def step(q, k, v, positions):
        return apply_rope(q, k, cos, sin, positions, k_cache=k_cache, v_cache=v_cache, v=v)

    q_rot, k_rot = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, positions)
    q_ref, k_ref = apply_rope_reference(q, k, cos, sin, positions)
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_cache[0][:, positions[0]], k_ref[0].transpose(0, 1))
    torch.testing.assert_close(v_cache[0][:, positions[0]], v[0].transpose(0, 1))
