"""CUDA-graph decode (runtime/cuda_graphs.py): replayed steps give the eager steps' tokens and
logits; where graphs cannot be used (CPU, other backends, gloo/MPI) everything runs eagerly.

The end-to-end comparisons need a CUDA GPU and skip without one; the fixed-grid decode kernel
is also checked on the CPU in Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import Engine
from runtime.cuda_graphs import batch_buckets, unsupported_reason
from runtime.piecewise_graphs import PiecewiseDecodeGraphs
from scheduler.request import SamplingParams

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


# -- without a GPU ---------------------------------------------------------------------------
def test_batch_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)


def test_unsupported_reasons_follow_the_device_and_communicator():
    # any attention backend: one without captured decode is captured in pieces
    cuda = torch.device("cuda", 0)
    assert unsupported_reason(cuda, "none") is None
    assert unsupported_reason(cuda, "nccl") is None
    assert "CUDA" in unsupported_reason(torch.device("cpu"), "none")
    for comm in ("gloo", "mpi"):
        assert comm in unsupported_reason(cuda, comm)


def test_a_backend_without_captured_decode_refuses_a_captured_step():
    """The contract: a captured step reaches only backends that declare they can run it."""
    from runtime.attention.base import AttentionMetadata, CapturedDecode
    from runtime.attention.torch_tiled import TorchTiledBackend

    meta = AttentionMetadata.build([1], [5], [[0]], 16)
    captured = AttentionMetadata(
        meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.slot_mapping,
        query_lens_cpu=(1,), seq_lens_cpu=None,
        captured=CapturedDecode(64, torch.zeros(1, dtype=torch.int32)),
    )  # fmt: skip
    assert captured.max_seq_len == 64 and meta.max_seq_len == 5
    q, cache = torch.randn(1, 4, 8), torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="cannot run a captured decode"):
        TorchTiledBackend().forward(q, cache, cache, captured, 0.3)


@pytest.mark.parametrize("capacity", [16, 700, 8192, 131072])
def test_triton_captured_decode_values_fit_the_frozen_grid(capacity):
    """For every batch size and real length up to the capacity, the keys per split program the
    backend asks a replay to use cover the longest sequence within the grid the graph froze
    for the capacity, in whole key blocks."""
    from runtime.attention import triton_decode
    from runtime.attention.triton_backend import TritonBackend

    backend = TritonBackend()
    assert backend.captured_decode_params == 1
    dev = torch.device("cuda" if ON_GPU else "cpu")
    hkv, d = 2, 64
    cfg = triton_decode.default_decode_config(d, torch.bfloat16, dev)
    for bs in (1, 3, 8):
        grid = triton_decode.split_plan(bs, hkv, capacity, dev, cfg)[1]
        for n in sorted({1, 17, capacity // 3 + 1, capacity - 1, capacity} - {0}):
            values = backend.captured_decode_values(bs, n, capacity, hkv, d, torch.bfloat16, dev)
            assert len(values) == backend.captured_decode_params
            (chunk,) = values
            assert chunk > 0 and chunk % cfg.block_n == 0
            assert -(-n // chunk) <= grid, (bs, n, chunk, grid)


class _FakeGraphs:
    """Stands in for DecodeGraphs (which needs CUDA): fits everything, fails when told to."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls, self.graphs = fail, 0, {}

    def fits(self, chunks) -> bool:
        return True

    def run(self, chunks, fill_pending=None):
        self.calls += 1
        if self.fail:
            raise RuntimeError("capture broke")
        return torch.ones(len(chunks), 4)

    def capture(self, bs: int) -> None:
        self.run([None] * bs)
        self.graphs[bs] = True


def test_graph_runner_falls_back_alone_and_fails_in_a_group():
    from runtime.cuda_graphs import DecodeGraphRunner

    ok = DecodeGraphRunner(_FakeGraphs(), off=None)
    assert ok.active and ok.run([1, 2]).shape == (2, 4)
    with ok.eager():  # warm-up's eager window: no replay
        assert ok.run([1]) is None
    ok.warm_up()
    assert ok.captured_buckets == (1,) and ok.graphs.calls == 2

    broken = _FakeGraphs(fail=True)
    alone = DecodeGraphRunner(broken, off=None, world_size=1)
    assert alone.run([1]) is None  # the caller redoes the step eagerly
    assert not alone.active and "capture broke" in alone.off
    assert alone.run([1]) is None and broken.calls == 1  # never tried again

    group = DecodeGraphRunner(_FakeGraphs(fail=True), off=None, world_size=2)
    with pytest.raises(RuntimeError, match="capture broke"):
        group.run([1])  # the other ranks are inside the same collectives: fail, do not diverge
    with pytest.raises(ValueError):
        DecodeGraphRunner(None, off=None)


@pytest.mark.parametrize("graphs, reason", [(True, "device cpu is not CUDA"),
                                            (False, "turned off by config")])  # fmt: skip
def test_worker_says_why_graphs_are_off(graphs, reason):
    cfg = EngineConfig.from_dict(dict(
        model="tiny", device="cpu", attention="torch", dtype="float32",
        max_model_len=64, max_num_seqs=1, cuda_graphs=graphs, executor="local",
    ))  # fmt: skip
    engine = Engine(cfg)
    try:
        worker = engine.executor.worker
        assert not worker.uses_cuda_graphs and worker.decode_graphs.off == reason
    finally:
        engine.shutdown()


# -- the fixed-grid decode kernel (GPU, or the interpreter on CPU) -----------------------------
def _interpreter_ok() -> bool:
    if ON_GPU:
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    triton = pytest.importorskip("triton")
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the no-key row's log2(0)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fixed_grid_decode_matches_eager(dtype):
    """A grid sized for a capacity, keys per split read from a device tensor: the same result as
    the eager launch for the real lengths; a padding row with no keys gives zeros, lse -inf."""
    if not _interpreter_ok():
        pytest.skip("triton was imported without TRITON_INTERPRET in this process")
    from runtime.attention import triton_decode
    from runtime.attention.base import AttentionMetadata, CapturedDecode
    from runtime.attention.triton_backend import TritonBackend

    dev = torch.device("cuda" if ON_GPU else "cpu")
    cfg = triton_decode.DecodeConfig(
        block_n=32, num_warps=4, num_stages=1, programs_per_sm=16, min_chunk=64
    )
    backend = TritonBackend(decode_config=cfg)
    hq, hkv, d, page = 8, 2, 64, 16
    capacity = 2000 if ON_GPU else 700
    lens = [1, 113, 640, 37]
    nblk = -(-capacity // page)
    g = torch.Generator(device="cpu").manual_seed(3)
    num_blocks = len(lens) * nblk + 1
    perm = torch.randperm(num_blocks, generator=g)[: len(lens) * nblk].view(len(lens), nblk)
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype).to(dev)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=g).to(dtype).to(dev)
    q = torch.randn(len(lens) + 1, hq, d, generator=g).to(dtype).to(dev)
    tables = [perm[i, : -(-n // page)].tolist() for i, n in enumerate(lens)]
    eager = AttentionMetadata.build([1] * len(lens), lens, tables, page, dev)
    ref_out, ref_lse = backend.decode(q[: len(lens)], k_cache, v_cache, eager, 0.125)

    bs = len(lens) + 1  # one padding row: no keys at all
    seq_lens = torch.tensor([*lens, 0], dtype=torch.int32, device=dev)
    block_tables = torch.zeros(bs, nblk, dtype=torch.int32, device=dev)
    block_tables[: len(lens)] = perm.to(torch.int32).to(dev)
    (chunk,) = backend.captured_decode_values(bs, max(lens), capacity, hkv, d, dtype, dev)
    meta = AttentionMetadata(
        query_start_loc=torch.arange(bs + 1, dtype=torch.int32, device=dev),
        seq_lens=seq_lens,
        block_tables=block_tables,
        slot_mapping=torch.full((bs,), -1, dtype=torch.int64, device=dev),
        query_lens_cpu=(1,) * bs,
        seq_lens_cpu=None,
        captured=CapturedDecode(capacity, torch.tensor([chunk], dtype=torch.int32, device=dev)),
    )
    grid = triton_decode.split_plan(bs, hkv, capacity, dev, cfg)[1]
    assert 1 < -(-max(lens) // chunk) < grid  # several splits, and idle programs past them
    out, lse = backend.decode(q, k_cache, v_cache, meta, 0.125)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[: len(lens)], ref_out, rtol=0, atol=atol)
    torch.testing.assert_close(lse[: len(lens)], ref_lse, rtol=0, atol=1e-4)
    assert torch.all(out[-1] == 0) and torch.all(lse[-1] == float("-inf"))


# -- end to end on a GPU ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not ON_GPU:
        pytest.skip("needs a CUDA GPU")
    from tests.hf_models import make_hf_llama

    d = tmp_path_factory.mktemp("graph_ckpt")
    make_hf_llama(
        d, "gqa", hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=8192,
    )  # fmt: skip
    return d


def _generate(path, prompts, news, graphs: bool, dtype: str, max_model_len: int = 4096,
              attention: str = "triton", block_size: int = 16):  # fmt: skip
    cfg = EngineConfig.from_dict(dict(
        model=str(path), device="cuda", dtype=dtype, attention=attention, prefill_chunk=1024,
        max_num_seqs=4, max_model_len=max_model_len, kv_cache_tokens=4 * max_model_len + 64,
        cuda_graphs=graphs, executor="local", block_size=block_size,
    ))  # fmt: skip
    engine = Engine(cfg)
    try:
        worker = engine.executor.worker
        assert worker.uses_cuda_graphs == graphs
        if graphs:
            assert worker.decode_graphs.captured_buckets == (1,)  # warm-up captured batch 1
            piecewise = isinstance(worker.decode_graphs.graphs, PiecewiseDecodeGraphs)
            assert piecewise == (attention != "triton")
        params = [SamplingParams(max_new_tokens=n) for n in news]
        outs = engine.generate(prompts, params, logits="sampled")
        captured = list(worker.decode_graphs.captured_buckets)
    finally:
        engine.shutdown()
    return [(o.token_ids, o.metrics["logits"]) for o in outs], captured


CASES = {
    # name: (prompt lengths, new tokens each); max_num_seqs=4 so buckets are 1, 2, 4
    "one-token-prompt": ([1], [24]),
    "short": ([17], [24]),
    "1.5K": ([1500], [24]),
    "3.9K": ([3900], [40]),  # crosses several split programs, ends near the capacity
    # batch 3 (bucket 4) shrinking to 2 and 1 as the sequences finish
    "batch3-ragged": ([5, 1200, 300], [30, 12, 20]),
    "batch4": ([100, 2200, 40, 700], [16, 16, 16, 16]),
}


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_graphs_match_eager_float32(checkpoint, case):
    lens, news = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in lens]
    on, captured = _generate(checkpoint, prompts, news, True, "float32")
    off, _ = _generate(checkpoint, prompts, news, False, "float32")
    want = {1} | {4 if len(lens) == 3 else len(lens)}
    if len(lens) == 3:
        want |= {2}
    assert want <= set(captured)
    for (tok_on, lg_on), (tok_off, lg_off) in zip(on, off):
        assert tok_on == tok_off
        torch.testing.assert_close(lg_on, lg_off, rtol=1e-4, atol=2e-4)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 64])
def test_graphs_match_eager_bfloat16(checkpoint, block_size):
    """On sm_90 the replayed steps take the TMA decode kernel (with 64-token blocks every key tile
    is one page, so any table), the eager ones gather."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (900, 60, 2500)]
    news = [12, 12, 12]
    kw = dict(max_model_len=8192, block_size=block_size)
    on, captured = _generate(checkpoint, prompts, news, True, "bfloat16", **kw)
    off, _ = _generate(checkpoint, prompts, news, False, "bfloat16", **kw)
    assert 4 in captured
    for (tok_on, lg_on), (tok_off, lg_off) in zip(on, off):
        assert tok_on == tok_off
        scale = lg_off.abs().max().item()
        assert (lg_on - lg_off).abs().max().item() <= 2e-2 * scale


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["efficient_cuda", "torch"])
@pytest.mark.parametrize("case", ["short", "1.5K", "batch3-ragged", "batch4"])
def test_piecewise_graphs_match_eager(checkpoint, case, attention):
    """Backends without captured decode: the stretches between their attention calls replayed,
    attention eager with the real lengths; the same tokens as all-eager decode, padding rows of
    a bucket (batch 3 in bucket 4) writing and reading nothing."""
    lens, news = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in lens]
    on, captured = _generate(checkpoint, prompts, news, True, "float32", attention=attention)
    off, _ = _generate(checkpoint, prompts, news, False, "float32", attention=attention)
    assert {1, 4 if len(lens) >= 3 else len(lens)} <= set(captured)
    for (tok_on, lg_on), (tok_off, lg_off) in zip(on, off):
        assert tok_on == tok_off
        torch.testing.assert_close(lg_on, lg_off, rtol=1e-4, atol=2e-4)
