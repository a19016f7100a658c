"""Two-tier KV cache: swaps move exactly the right blocks, and attention over block tables that
mix device and host blocks equals attention over all-device blocks (float64 reference).

Placements are seeded random: every full block before a sequence's first query position may be
on the host (the scheduler's invariant); the rest are on the device at shuffled ids. Both ways of
attending (stream: staged copies, one kernel call; cooperate: part on the CPU, merged by lse) and
a staging area too small for the step (the rest streams in rounds on the device, merged by lse;
nothing goes to the CPU) are checked for the torch, sdpa and triton (interpreter) backends,
prefill chunks and decode, GQA, ragged lengths.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention.base import AttentionMetadata
from runtime.attention.merge import merge_attention_states
from runtime.attention.partial import CPU_METHODS, visible_attention
from runtime.attention.registry import get_backend
from runtime.kv_cache import KVCache
from runtime.spill_step import SpillInvariantError, SpillStep
from scheduler.batch import SeqChunk
from tests.spill_setup import PARAMS, build, max_err, run_step

# (query lens, seq lens): decode, prefill chunks after a long prefix, mixed, ragged
CASES = {
    "decode": ([1], [113]),
    "decode-batch": ([1, 1, 1], [17, 1, 113]),
    "chunk": ([17], [113]),
    "mixed": ([1, 17, 5, 1], [300, 113, 17, 64]),
}
SMALL = {  # for Triton's interpreter
    "decode": ([1, 1], [17, 40]),
    "chunk": ([5], [40]),
}


BACKENDS = ["torch", "sdpa"]
MODES = {"stream": 0.0, "cooperate": 0.5, "cpu-all": 1.0}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", [(16, 4, 4), (7, 8, 2)], ids=["mha-bs16", "gqa4-bs7"])
def test_mixed_tables_equal_all_device(case, backend_name, mode, layout):
    bs, hq, hkv = layout
    d = 16
    qlens, slens = CASES[case]
    for seed in (0, 1):
        case_ = build(qlens, slens, bs=bs, hq=hq, hkv=hkv, d=d, seed=seed)
        kv = case_.kv
        # seed 0: the host blocks arrive by this step's own swaps; seed 1: by an earlier step's
        if seed == 1:
            case_.land_swaps()
        backend = get_backend(
            backend_name, "cpu", **({"kv_tile": 37} if backend_name == "torch" else {})
        )
        figs, results = run_step(case_, backend, MODES[mode])
        for out, ref, plain in results:
            assert torch.isfinite(out).all()
            assert max_err(out, ref) < 1e-5
            if MODES[mode] == 0:  # stream: the same kernel over the same keys, bit for bit
                assert torch.equal(out, plain)
        if figs.host_blocks:
            expect = "stream" if MODES[mode] == 0 else "cooperate"
            if MODES[mode] == 0.5 and figs.cpu_blocks == 0:
                expect = "stream"  # one host block per sequence rounds to none on the CPU
            assert figs.mode == expect
        per_layer_swap = len(case_.swaps) * kv.host_layer_block_bytes
        staged = figs.host_blocks - figs.cpu_blocks  # distinct here: no block is shared
        assert figs.bytes_moved == kv.num_layers * (
            per_layer_swap + staged * kv.host_layer_block_bytes
        )


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("case", CASES)
def test_cooperate_by_every_cpu_method(case, method):
    """The CPU share by each method the rate measurement may pick: equal to the float64
    reference, with this step's own swaps landing before the CPU reads the host blocks."""
    qlens, slens = CASES[case]
    case_ = build(qlens, slens, bs=7, hq=8, hkv=2, d=16, seed=9, p_host=0.8)
    figs, results = run_step(case_, get_backend("torch", "cpu"), 1.0, cpu_method=method)
    assert figs.cpu_blocks > 0 and figs.mode == "cooperate"
    for out, ref, _ in results:
        assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("fraction", [0.0, 0.5], ids=["stream", "cooperate"])
@pytest.mark.parametrize("staging", [1, 2, 3])
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_staging_overflow_streams_in_rounds(case, backend_name, staging, fraction):
    """A staging buffer of 1-3 blocks for a step over many host blocks: the first buffer-full
    goes through the main kernel, the rest in rounds of half a buffer (one block when the
    buffer holds one), all on the device; the CPU takes only the share it was given."""
    qlens, slens = CASES[case]
    case_ = build(qlens, slens, bs=7, hq=8, hkv=2, d=16, seed=3, p_host=0.9, staging=staging)
    case_.land_swaps()
    kv = case_.kv
    figs, results = run_step(case_, get_backend(backend_name, "cpu"), fraction)
    for out, ref, _ in results:
        assert torch.isfinite(out).all()
        assert max_err(out, ref) < 1e-5
    # what the CPU took is exactly its share, whatever the staging area holds
    assert figs.cpu_blocks == sum(round(fraction * n) for n in case_.host_blocks_per_seq())
    streamed = figs.host_blocks - figs.cpu_blocks
    assert figs.bytes_moved == kv.num_layers * streamed * kv.host_layer_block_bytes
    if streamed > staging:
        assert figs.mode == ("cooperate" if figs.cpu_blocks else "stream")


@pytest.mark.parametrize("mode", ["stream", "cooperate", "rounds"])
@pytest.mark.parametrize("case", SMALL)
def test_mixed_tables_triton_interpreter(case, mode):
    pytest.importorskip("triton")
    from runtime.attention.registry import resolve_backend_name

    try:
        resolve_backend_name("triton", torch.device("cpu"))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton backend unavailable on CPU: {e}")
    qlens, slens = SMALL[case]
    case_ = build(
        qlens, slens, bs=4, hq=4, hkv=2, d=16, seed=5, layers=2,
        staging=2 if mode == "rounds" else None, p_host=0.9 if mode == "rounds" else 0.6,
    )  # fmt: skip
    fraction = 0.5 if mode == "cooperate" else 0.0
    figs, results = run_step(case_, get_backend("triton", "cpu"), fraction)
    assert figs.host_blocks > (2 if mode == "rounds" else 0)
    assert figs.cpu_blocks == 0 or mode == "cooperate"
    for out, ref, _ in results:
        assert max_err(out, ref) < 1e-4


def test_host_block_that_is_not_before_the_queries_is_refused():
    kv = KVCache(
        1, 8, 4, 1, 8, torch.float32, torch.device("cpu"), host_blocks=4, pin_in_background=False
    )
    chunk = SeqChunk(0, (0, 0), 6, (0, 8), False, PARAMS)  # host block 8 holds positions 4..7
    with pytest.raises(SpillInvariantError, match="host block 8 at table entry 1"):
        SpillStep(kv, [chunk])


def test_swaps_move_exactly_the_right_blocks():
    """Spills, fetches, device and host copies in one ordered list, a source overwritten after
    it was read: every block ends as sequential semantics say, nothing else changes, and the
    bytes reported are the cross-tier copies."""
    L, D, H, bs, h, d = 3, 6, 5, 4, 2, 8
    kv = KVCache(
        L, D, bs, h, d, torch.float32, torch.device("cpu"), host_blocks=H, pin_in_background=False
    )
    g = torch.Generator().manual_seed(0)
    truth = {}
    for b in range(D + H):
        x = torch.randn(L, 2, bs, h, d, generator=g)
        truth[b] = x
        for li in range(L):
            if b < D:
                kv.layers[li][0][b], kv.layers[li][1][b] = x[li, 0], x[li, 1]
            else:
                chunk, row = kv.host.locate(b - D)
                kv.host.chunk(chunk)[li, :, row] = x[li]
    swaps = [(1, 6), (2, 7), (3, 8), (6, 1), (1, 9), (4, 5), (9, 10), (8, 2), (0, 3)]
    expect = dict(truth)
    for s, t in swaps:
        expect[t] = expect[s]
    cross = sum(1 for s, t in swaps if (s >= D) != (t >= D))
    moved = sum(kv.copy_blocks(li, swaps) for li in range(L))
    assert moved == L * cross * kv.host_layer_block_bytes
    assert kv.host_layer_block_bytes == 2 * bs * h * d * 4
    for b in range(D + H):
        for li in range(L):
            if b < D:
                got = torch.stack([kv.layers[li][0][b], kv.layers[li][1][b]])
            else:
                chunk, row = kv.host.locate(b - D)
                got = kv.host.chunk(chunk)[li, :, row]
            assert torch.equal(got, expect[b][li]), (b, li)


def test_host_pool_chunks_and_runs_across_them():
    """Host blocks spread over several small chunks: runs split at chunk ends, contents kept."""
    L, D, H, bs, h, d = 2, 4, 10, 2, 1, 4
    kv = KVCache(
        L, D, bs, h, d, torch.float32, torch.device("cpu"), host_blocks=H, pin_in_background=False
    )
    kv.host = type(kv.host)(
        H,
        L,
        (bs, h, d),
        torch.float32,
        pin=False,
        chunk_bytes=3 * kv.host.block_bytes,
        background=False,
    )
    assert kv.host.chunk_blocks == 3 and kv.host.num_chunks == 4
    g = torch.Generator().manual_seed(1)
    x = torch.randn(L, 2, 4, bs, h, d, generator=g)
    for li in range(L):
        kv.layers[li][0][:], kv.layers[li][1][:] = x[li, 0], x[li, 1]
    pairs = [(0, D + 1), (1, D + 2), (2, D + 3), (3, D + 4)]  # rows 1..4 cross chunk 0 -> 1
    for li in range(L):
        kv.copy_blocks(li, pairs)
    k, v = kv.host_kv(1, [D + 1, D + 2, D + 3, D + 4])
    assert [t.shape[0] for t in k] == [2 * bs, 2 * bs]  # two runs: rows 1-2 | 3-4 (chunk 1)
    assert torch.equal(torch.cat(k), x[1, 0].reshape(-1, h, d))
    assert torch.equal(torch.cat(v), x[1, 1].reshape(-1, h, d))
    assert kv.host.allocated_bytes == 2 * 3 * kv.host.block_bytes  # chunks 0 and 1 only


def test_block_zero_is_finite_and_nothing_else_is_filled():
    kv = KVCache(3, 5, 4, 2, 8, torch.float32, torch.device("cpu"))
    for k, v in kv.layers:
        assert torch.equal(k[0], torch.zeros_like(k[0])) and torch.equal(
            v[0], torch.zeros_like(v[0])
        )


def test_merge_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 8, 16, generator=g, dtype=torch.float64)
    k = torch.randn(300, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(300, 2, 16, generator=g, dtype=torch.float64)
    perm = torch.randperm(300, generator=g)
    a, b = perm[:123], perm[123:]
    oa, la = visible_attention(q, k[a], v[a], 0.25, kv_tile=50)
    ob, lb = visible_attention(q, k[b], v[b], 0.25, kv_tile=64)
    out, lse = merge_attention_states(oa, la, ob, lb)
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    s = torch.einsum("qhd,khd->hqk", q, kr) * 0.25
    ref = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vr)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert (lse.double() - torch.logsumexp(s, -1).T).abs().max().item() < 1e-5
    # an empty side merges as "saw nothing"
    oe, le = visible_attention(q, k[:0], v[:0], 0.25)
    out2, lse2 = merge_attention_states(oa, la, oe, le)
    assert torch.allclose(out2, oa.float()) and torch.allclose(lse2, la.float())


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_8bit_host_blocks_round_trip_within_the_format_bound(kind):
    L, D, H, bs, h, d = 2, 4, 4, 8, 2, 16
    kv = KVCache(
        L,
        D,
        bs,
        h,
        d,
        torch.float32,
        torch.device("cpu"),
        host_blocks=H,
        host_dtype=kind,
        pin_in_background=False,
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(L, 2, D, bs, h, d, generator=g) * torch.logspace(-3, 2, D).view(
        1, 1, D, 1, 1, 1
    )
    x[0, 0, 1] = 0  # an all-zero block
    for li in range(L):
        kv.layers[li][0][:], kv.layers[li][1][:] = x[li, 0], x[li, 1]
        moved = kv.copy_blocks(li, [(b, D + b) for b in range(D)])
        assert moved == D * (2 * bs * h * d * 1 + 8)  # one byte per value, two scales
        kv.layers[li][0].fill_(float("nan"))
        kv.copy_blocks(li, [(D + b, b) for b in range(D)])  # fetch back (dequantised)
    for li in range(L):
        for kind_i in (0, 1):
            got, want = kv.layers[li][kind_i], x[li, kind_i]
            amax = want.abs().amax(dim=(1, 2, 3), keepdim=True)
            if kind == "int8":
                bound = amax / 254 * 1.001
            else:  # 3 mantissa bits: half a step of 2^-3 relative, subnormals below 2^-6
                scale = amax / 448
                bound = torch.maximum(want.abs() / 16, scale * 2**-10) * 1.001
            err = (got - want).abs()
            assert (err <= bound + 1e-12).all()
            assert err.max() > 0  # it did quantise
    assert torch.equal(kv.layers[0][0][1], torch.zeros_like(x[0, 0, 1]))  # zeros stay zeros


@pytest.mark.parametrize("fraction", [0.0, 1.0], ids=["stream", "cpu"])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_attention_over_8bit_host_blocks_is_close(kind, fraction):
    qlens, slens = CASES["mixed"]
    case_ = build(qlens, slens, bs=16, hq=8, hkv=2, d=16, seed=6, p_host=1.0, host_dtype=kind)
    figs, results = run_step(case_, get_backend("torch", "cpu"), fraction)
    assert figs.host_blocks > 0
    tol = 0.1 if kind == "fp8" else 0.03
    errs = [max_err(out, ref) for out, ref, _ in results]
    assert 0 < max(errs) < tol, errs


def test_host_pool_grows_as_it_fills():
    """Nothing is allocated at start; ``pin_ahead`` asks for the first ``ahead`` chunks, then
    chunks are allocated ``ahead`` of the highest one used, in the background; ``pin_all``
    asks for the rest; nothing is allocated that nobody asked for."""
    from runtime.host_pool import HostPool

    pool = HostPool(10, 1, (2, 1, 4), torch.float32, pin=False, chunk_bytes=64, ahead=2)
    try:
        assert pool.chunk_blocks == 1 and pool.num_chunks == 10
        assert pool.wait_allocated(60)
        assert all(c is None for c in pool._chunks)
        pool.pin_ahead()
        assert pool.wait_allocated(60)
        assert [c is not None for c in pool._chunks] == [True] * 2 + [False] * 8
        pool.chunk(4)  # in use: 4 itself (now, in the foreground if need be) and 2 more ahead
        assert pool.wait_allocated(60)
        assert [c is not None for c in pool._chunks] == [True] * 7 + [False] * 3
        pool.pin_all()
        assert pool.wait_allocated(60)
        assert all(c is not None for c in pool._chunks)
    finally:
        pool.close()


def test_the_cpu_part_runs_with_its_own_threads(monkeypatch):
    """A GPU worker under Ray has one torch thread; the CPU share of cooperative attention runs
    with the threads the worker gives it, and the process's setting is restored afterwards."""
    import runtime.spill_step as spill_step
    from runtime.attention.partial import host_attention

    seen = []

    def recording(*a, **kw):
        seen.append(torch.get_num_threads())
        return host_attention(*a, **kw)

    monkeypatch.setattr(spill_step, "host_attention", recording)
    qlens, slens = CASES["chunk"]
    case_ = build(qlens, slens, bs=7, hq=8, hkv=2, d=16)
    case_.land_swaps()
    kv, table = case_.kv, tuple(case_.tables[0])
    chunks = [SeqChunk(0, (0,) * qlens[0], slens[0] - qlens[0], table, False, PARAMS)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = SpillStep(kv, chunks, cpu_fraction=1.0, cpu_threads=2)
        meta = AttentionMetadata.build(qlens, step.seq_lens, step.tables, kv.block_size)
        step.bind(meta)
        q = torch.randn(qlens[0], 8, 16)
        k_new = torch.randn(qlens[0], 2, 16)
        kc, vc = kv.layers[0]
        step.attention(q, k_new, k_new, kc, vc, get_backend("torch", "cpu"), 0.25)
        assert seen == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _kernel_rows(step: SpillStep, i: int) -> list[int]:
    """Sequence ``i``'s table as the device kernel reads it: staged entries past the pool."""
    off = 10**6  # any staging offset: what matters is the order of the slots
    return [off + t if m else t for t, m in zip(step.tables[i], step.staged_mask[i])]


def _broken_tiles(rows: list[int], per_tile: int) -> list[int]:
    """Tiles (``per_tile`` table entries from a multiple of it) whose blocks are not consecutive
    rows: ``triton_prefill_hopper._pages_in_order``'s rule, the TMA kernels' condition."""
    return [
        t
        for t in range(0, len(rows), per_tile)
        if any(rows[j] != rows[j - 1] + 1 for j in range(t + 1, min(t + per_tile, len(rows))))
    ]


@pytest.mark.parametrize("qlen", [1, 40])
def test_staging_fills_key_tiles_so_every_tile_is_consecutive_rows(qlen):
    """The scheduler's placement of a long prompt (sink block on the device, the oldest middle on
    the host, the newest on the device, each tier's ids in order): the tiles holding the sink and
    the end of the host range would mix device ids and staging slots, so the TMA kernels would
    fall back to gathering for the whole sequence. The step stages those tiles' device blocks
    too: every tile is consecutive rows, and the output equals the all-device kernel's bit for
    bit (NaN in every row no block holds)."""
    from runtime.spill_step import TILE_KEYS

    bs, n = 16, 50
    per_tile = TILE_KEYS // bs
    placement = ["dev"] + ["host"] * 29 + ["dev"] * (n - 30)
    case_ = build(
        [qlen], [n * bs], bs=bs, hq=4, hkv=2, d=16, placement=placement, in_order=True,
        staging=64,
    )  # fmt: skip
    case_.land_swaps()
    chunk = SeqChunk(0, (0,) * qlen, n * bs - qlen, tuple(case_.tables[0]), False, PARAMS)
    step = SpillStep(case_.kv, [chunk])
    assert _broken_tiles(_kernel_rows(step, 0), per_tile) == []
    # the fill: blocks 0 and 30-31 (the sink's tile and the tile where the host range ends)
    assert step.staged_mask[0] == [True] * 32 + [False] * (n - 32)
    figs, results = run_step(case_, get_backend("torch", "cpu"), 0.0)
    for out, ref, plain in results:
        assert torch.equal(out, plain)
        assert max_err(out, ref) < 1e-5
    # bytes moved count the host blocks only; the device blocks are copied within the device
    assert figs.host_blocks == 29
    assert figs.bytes_moved == case_.kv.num_layers * 29 * case_.kv.host_layer_block_bytes


def test_staging_fill_leaves_tiles_it_cannot_complete():
    """A tile whose other blocks include the step's own (written this step) is not filled, nor
    anything when the staging buffer has no room for the fill, nor a sequence the CPU helps."""
    from runtime.spill_step import TILE_KEYS

    bs = 16
    per_tile = TILE_KEYS // bs
    # host blocks up to the one before the query's: their tile holds the step's own block
    placement = ["dev"] + ["host"] * 12 + ["dev"] * 3
    case_ = build([20], [16 * bs], bs=bs, hq=4, hkv=2, d=16, placement=placement,
                  in_order=True, staging=64)  # fmt: skip
    chunk = SeqChunk(0, (0,) * 20, 16 * bs - 20, tuple(case_.tables[0]), False, PARAMS)
    step = SpillStep(case_.kv, [chunk])
    rows = _kernel_rows(step, 0)
    assert _broken_tiles(rows, per_tile) == [per_tile]  # the tile with blocks 13-15
    assert step.staged_mask[0][0]  # the sink's tile was filled
    small = build([20], [16 * bs], bs=bs, hq=4, hkv=2, d=16, placement=placement,
                  in_order=True, staging=12)  # fmt: skip
    step = SpillStep(small.kv, [chunk])
    assert not step.staged_mask[0][0] and step._fill is None
    step = SpillStep(case_.kv, [chunk], cpu_fraction=0.5)
    assert step._fill is None
