"""The portable tiled backend (and the SDPA one) against the float64 paged reference.

Ragged lengths (1, 17, 113, 1023) leave partial query and key tiles; tile sizes include ones that
are not multiples of the block size and ones larger than the sequence; KV blocks sit at shuffled
block ids, and every unused cache slot holds random values that must never be read. bf16 is
judged by the FlashAttention rule: our error against float64 is at most twice that of a naive
bf16 computation, plus 1e-3.
"""

from __future__ import annotations

import functools

import pytest
import torch

from runtime import cpu_module
from runtime.attention.base import AttentionMetadata
from runtime.attention.merge import merge_attention_states
from runtime.attention.reference import gather_kv, reference_attention
from runtime.attention.registry import UnknownBackendError, get_backend, resolve_backend_name
from runtime.attention.sdpa import SdpaBackend
from runtime.attention.torch_tiled import TorchTiledBackend

# (query lens, seq lens) of one batch
CASES = [
    ([1], [1]),
    ([17], [17]),
    ([113], [113]),
    ([1023], [1023]),
    ([17], [113]),  # chunked prefill: queries are the last 17 of 113 positions
    ([113], [1023]),
    ([1], [1023]),  # decode
    ([1, 1, 1, 1], [17, 1, 1023, 113]),  # ragged decode batch
    ([1, 113, 17, 64], [1023, 113, 17, 1023]),  # decode, prefill and chunk mixed in one call
]
CASE_IDS = ["-".join(f"{q}of{s}" for q, s in zip(*c)) for c in CASES]
TILES = [(128, 512), (37, 23), (64, 32), (2048, 4096)]  # (q_tile, kv_tile)
LAYOUTS = [(16, 4, 4), (7, 8, 2), (16, 8, 1)]  # (block_size, Hq, Hkv): GQA ratios 1, 4, 8


def make_case(query_lens, seq_lens, hq, hkv, d, block_size, dtype=torch.float32, seed=0):
    """Random q and a random paged cache whose blocks sit at shuffled, non-contiguous ids."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(counts) + 5  # spare blocks: junk that must never be read
    ids = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for n in counts:
        tables.append(ids[i : i + n])
        i += n
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    q = torch.randn(sum(query_lens), hq, d, generator=g).to(dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    return q, k_cache, v_cache, meta


@functools.cache
def case_with_reference(case_id, hq, hkv, d, block_size, dtype=torch.float32, seed=0):
    """``make_case`` plus its float64 reference, computed once for all tile sizes."""
    q, kc, vc, meta = make_case(
        *CASES[CASE_IDS.index(case_id)], hq, hkv, d, block_size, dtype, seed
    )
    return (q, kc, vc, meta), reference_attention(q, kc, vc, meta, d**-0.5)


def naive_attention(q, k_cache, v_cache, meta, scale):
    """The textbook computation in the inputs' own dtype: the baseline for the bf16 rule."""
    group = q.shape[1] // k_cache.shape[2]
    outs, start = [], 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        k = gather_kv(k_cache, meta.block_tables[b], slen).repeat_interleave(group, 1)
        v = gather_kv(v_cache, meta.block_tables[b], slen).repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[start : start + qlen], k) * scale
        hidden = torch.arange(slen)[None, :] > torch.arange(slen - qlen, slen)[:, None]
        p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        start += qlen
    return torch.cat(outs)


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("block_size,hq,hkv", LAYOUTS)
@pytest.mark.parametrize(
    "tiles",
    # the fast lane keeps the ragged tiles (partial tiles everywhere); all run in the full suite
    [pytest.param(t, marks=() if t == (37, 23) else pytest.mark.slow) for t in TILES],
    ids=lambda t: f"tile{t[0]}x{t[1]}",
)
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow if "1023" in c else ()) for c in CASE_IDS]
)
def test_tiled_matches_reference_fp32(case, tiles, block_size, hq, hkv):
    d = 16 if "1023" in case else 32
    (q, kc, vc, meta), (ref_out, ref_lse) = case_with_reference(case, hq, hkv, d, block_size)
    out, lse = TorchTiledBackend(*tiles).forward(q, kc, vc, meta, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert max_err(out, ref_out) < 1e-5
    assert max_err(lse, ref_lse) < 1e-5


@pytest.mark.slow  # bf16 matmuls are slow on CPUs
@pytest.mark.parametrize("tiles", [(128, 512), (37, 23)], ids=lambda t: f"tile{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", CASE_IDS)
def test_tiled_bf16_within_flash_rule(case, tiles):
    d = 64
    (q, kc, vc, meta), (ref_out, ref_lse) = case_with_reference(
        case, 8, 2, d, 16, torch.bfloat16, seed=1
    )
    out, lse = TorchTiledBackend(*tiles).forward(q, kc, vc, meta, d**-0.5)
    naive = naive_attention(q, kc, vc, meta, d**-0.5)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref_out) <= 2 * max_err(naive, ref_out) + 1e-3
    # lse is float32 arithmetic on bf16 inputs: as tight as fp32
    assert max_err(lse, ref_lse) < 1e-4


@pytest.mark.slow
def test_large_logits_need_the_running_max():
    # scores in the hundreds: exp without the running max overflows float32
    q, kc, vc, meta = make_case([113, 1], [1023, 500], 8, 2, 16, 7, seed=2)
    q = q * 30
    out, lse = TorchTiledBackend(37, 23).prefill(q, kc, vc, meta, 0.25)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.25)
    assert torch.isfinite(out).all()
    assert max_err(out, ref_out) < 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"tile{t[0]}x{t[1]}")
def test_decode_path_equals_prefill_path(tiles):
    q, kc, vc, meta = make_case([1] * 5, [1023, 1, 600, 17, 1023], 8, 2, 16, 7, seed=3)
    backend = TorchTiledBackend(*tiles)
    out_d, lse_d = backend.decode(q, kc, vc, meta, 0.25)
    out_p, lse_p = backend.prefill(q, kc, vc, meta, 0.25)
    torch.testing.assert_close(out_d, out_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse_d, lse_p, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_tiles_above_the_diagonal_are_never_computed(monkeypatch):
    """Count the calls of the tile step: only visible and diagonal tiles reach it."""
    calls = {"full": 0, "diagonal": 0}
    backend = TorchTiledBackend(q_tile=64, kv_tile=64)
    step = backend._tile_step

    def counting_step(q, k, v, mask, *state):
        calls["full" if mask is None else "diagonal"] += 1
        # tile-sized work only: no score matrix larger than one tile exists
        assert q.shape[-2] <= 64 * 4 and k.shape[-2] <= 64
        step(q, k, v, mask, *state)

    monkeypatch.setattr(backend, "_tile_step", counting_step)

    # full prefill of 1024 = 16 x 16 tiles: 16 diagonal, 120 below it, 120 above it skipped
    q, kc, vc, meta = make_case([1024], [1024], 8, 2, 16, 16, seed=4)
    out, _ = backend.prefill(q, kc, vc, meta, 0.25)
    assert calls == {"full": 120, "diagonal": 16}
    assert max_err(out, reference_attention(q, kc, vc, meta, 0.25)[0]) < 1e-5

    # chunk of queries 896..1023: query tile 896..959 skips key tile 960..1023 and is diagonal on
    # 896..959; query tile 960..1023 is diagonal on 960..1023; the other 29 tiles are unmasked
    calls.update(full=0, diagonal=0)
    q, kc, vc, meta = make_case([128], [1024], 8, 2, 16, 16, seed=5)
    out, _ = backend.prefill(q, kc, vc, meta, 0.25)
    assert calls == {"full": 29, "diagonal": 2}
    assert max_err(out, reference_attention(q, kc, vc, meta, 0.25)[0]) < 1e-5


@pytest.mark.parametrize("block_size,hq,hkv", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sdpa_matches_reference(case, block_size, hq, hkv):
    q, kc, vc, meta = make_case(*case, hq, hkv, 16, block_size, seed=6)
    out, lse = SdpaBackend().forward(q, kc, vc, meta, 0.25)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.25)
    assert max_err(out, ref_out) < 1e-5
    assert max_err(lse, ref_lse) < 1e-5


def test_write_kv_places_keys_at_their_slots():
    query_lens, seq_lens, bs, hkv, d = [5, 1, 40], [5, 30, 40], 7, 2, 8
    _, kc, vc, meta = make_case(query_lens, seq_lens, 4, hkv, d, bs, seed=7)
    kc.zero_()
    vc.zero_()
    key = torch.randn(sum(query_lens), hkv, d)
    value = torch.randn(sum(query_lens), hkv, d)
    backend = TorchTiledBackend()
    backend.write_kv(key, value, kc, vc, meta.slot_mapping)
    start = 0
    for b, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
        table = meta.block_tables[b]
        assert torch.equal(gather_kv(kc, table, slen)[slen - qlen :], key[start : start + qlen])
        assert torch.equal(gather_kv(vc, table, slen)[slen - qlen :], value[start : start + qlen])
        start += qlen
    # nothing else was written
    assert int((kc != 0).any(-1).any(-1).sum()) == sum(query_lens)


def test_prefill_from_written_cache_matches_reference():
    # the serving order: write this step's keys, then attend over the cache
    query_lens = seq_lens = [17, 113]
    q, kc, vc, meta = make_case(query_lens, seq_lens, 8, 2, 16, 16, seed=8)
    key, value = torch.randn(130, 2, 16), torch.randn(130, 2, 16)
    backend = TorchTiledBackend(32, 48)
    backend.write_kv(key, value, kc, vc, meta.slot_mapping)
    out, lse = backend.prefill(q, kc, vc, meta, 0.25)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.25)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


def _partial(q, k, v, visible, scale):
    """Float64 attention of q [T,H,D] over keys [S,H,D] where ``visible`` [T,S] holds."""
    s = torch.einsum("thd,shd->hts", q, k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for a row with no keys
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])
    return torch.einsum("hts,shd->thd", p, v), lse.transpose(0, 1)


def test_merge_of_disjoint_key_sets_equals_full_attention():
    g = torch.Generator().manual_seed(9)
    T, S, H, D = 6, 50, 4, 16
    q, k, v = (torch.randn(n, H, D, generator=g, dtype=torch.float64) for n in (T, S, S))
    causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    in_a = torch.rand(S, generator=g) < 0.5  # keys interleaved at random between the two sets
    in_a[:S] &= torch.arange(S) != 0  # query 0 of a 1-key row sees key 0 only in set B ...
    vis_a, vis_b = causal & in_a, causal & ~in_a
    vis_a[0], vis_b[0] = False, causal[0]  # ... and nothing in set A: lse_a = -inf
    out_full, lse_full = _partial(q, k, v, causal, 0.25)
    out_a, lse_a = _partial(q, k, v, vis_a, 0.25)
    out_b, lse_b = _partial(q, k, v, vis_b, 0.25)
    assert torch.isneginf(lse_a[0]).all()
    out_a[0] = float("nan")  # an empty side's output must be ignored, whatever it holds

    out, lse = merge_attention_states(out_a.float(), lse_a.float(), out_b.float(), lse_b.float())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert max_err(out, out_full) < 1e-5
    assert max_err(lse, lse_full) < 1e-5

    # both sides empty: zeros and -inf, never nan
    empty = torch.full((T, H), float("-inf"))
    out, lse = merge_attention_states(out_a.float(), empty, out_a.float(), empty)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_of_two_backend_halves_equals_one_call():
    # decode over a cache split by blocks, as between host and device tiers: the first two blocks
    # of each sequence form one half, the remaining blocks the other; each half is a decode call
    # of its own (the query is the last position, so it sees every key of either half)
    seq_lens, bs, split = [600, 37], 16, 2
    q, kc, vc, meta = make_case([1, 1], seq_lens, 8, 2, 16, bs, seed=10)
    tables = [meta.block_tables[b, : -(-n // bs)].tolist() for b, n in enumerate(seq_lens)]
    host = AttentionMetadata.build([1, 1], [split * bs] * 2, [t[:split] for t in tables], bs)
    device_lens = [n - split * bs for n in seq_lens]
    device = AttentionMetadata.build([1, 1], device_lens, [t[split:] for t in tables], bs)
    backend = TorchTiledBackend(64, 100)
    out, lse = merge_attention_states(
        *backend.decode(q, kc, vc, host, 0.25), *backend.decode(q, kc, vc, device, 0.25)
    )
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.25)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


def test_registry_names_and_unknown_name():
    assert isinstance(get_backend("torch", q_tile=64), TorchTiledBackend)
    assert get_backend("torch", q_tile=64).q_tile == 64
    assert isinstance(get_backend("sdpa"), SdpaBackend)
    default = "fa2_cpu" if cpu_module.compiler() else "flash_cpu"
    assert resolve_backend_name("auto", torch.device("cpu")) == default
    with pytest.raises(UnknownBackendError) as e:
        get_backend("nope")
    for name in ("nope", "torch", "sdpa", "triton"):
        assert name in str(e.value)


@pytest.mark.parametrize("arg", ["q_tile", "kv_tile"])
@pytest.mark.parametrize("bad", [0, -4, 1.5, True, "8"])
def test_tile_sizes_are_validated(arg, bad):
    with pytest.raises(ValueError, match=arg):
        TorchTiledBackend(**{arg: bad})


def test_heads_must_group_evenly():
    q, kc, vc, meta = make_case([3], [3], 6, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        TorchTiledBackend().prefill(q, kc, vc, meta, 1.0)


@pytest.mark.parametrize("tiles", [(128, 512), (37, 23)], ids=lambda t: f"tile{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", CASE_IDS)
def test_tiled_mixed_precision_within_flash_rule(case, tiles):
    """The GPU's mixed path (half matmul operands, float32 scores and statistics, P rounded to
    bf16 for PV), run here with its float32 matmul fallback: same arithmetic otherwise."""
    d = 64
    (q, kc, vc, meta), (ref_out, ref_lse) = case_with_reference(
        case, 8, 2, d, 16, torch.bfloat16, seed=1
    )
    backend = TorchTiledBackend(*tiles, mixed=True)
    assert backend._is_mixed(q) and not TorchTiledBackend(*tiles)._is_mixed(q)
    out, lse = backend.prefill(q, kc, vc, meta, d**-0.5)
    naive = naive_attention(q, kc, vc, meta, d**-0.5)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref_out) <= 2 * max_err(naive, ref_out) + 1e-3
    # the row sums add P as rounded for the PV matmul: lse is good to bf16's 2^-8, not fp32's
    assert max_err(lse, ref_lse) < 4e-3
