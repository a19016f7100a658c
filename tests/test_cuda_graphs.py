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
from runtime.cuda_graphs import GraphDecodeMetadata, batch_buckets, unsupported_reason
from scheduler.errors import ConfigError
from scheduler.request import SamplingParams

ON_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


# -- without a GPU ---------------------------------------------------------------------------
def test_batch_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)


def test_unsupported_reasons():
    cuda = torch.device("cuda", 0)
    assert unsupported_reason(cuda, "triton", "none") is None
    assert unsupported_reason(cuda, "triton", "nccl") is None
    assert "CUDA" in unsupported_reason(torch.device("cpu"), "triton", "none")
    assert "triton" in unsupported_reason(cuda, "torch", "none")
    for comm in ("gloo", "mpi"):
        assert comm in unsupported_reason(cuda, "triton", comm)


def test_config_field():
    assert EngineConfig.from_dict({}).worker.cuda_graphs is True
    assert EngineConfig.from_dict({"cuda_graphs": False}).worker.cuda_graphs is False
    with pytest.raises(ConfigError, match="cuda_graphs"):
        EngineConfig.from_dict({"cuda_graphs": "no"})


def test_not_used_on_cpu():
    """On the CPU the worker never makes graphs, and generation is unchanged."""
    prompts = [[1, 2, 3, 4, 5], list(range(7, 40))]
    outs = {}
    for graphs in (True, False):
        cfg = EngineConfig.from_dict(dict(
            model="tiny", device="cpu", attention="torch", dtype="float32",
            max_model_len=128, max_num_seqs=2, cuda_graphs=graphs, executor="local",
        ))  # fmt: skip
        engine = Engine(cfg)
        try:
            worker = engine.executor.worker
            assert not worker.uses_cuda_graphs and worker._graphs is None
            res = engine.generate(prompts, SamplingParams(max_new_tokens=6), logits="sampled")
            outs[graphs] = [(o.token_ids, o.metrics["logits"]) for o in res]
        finally:
            engine.shutdown()
    for (tok_on, lg_on), (tok_off, lg_off) in zip(outs[True], outs[False]):
        assert tok_on == tok_off
        torch.testing.assert_close(lg_on, lg_off, rtol=0, atol=0)


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
    from runtime.attention.base import AttentionMetadata
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
    chunk = backend.decode_chunk(bs, hkv, d, dtype, dev, max(lens), capacity)
    meta = GraphDecodeMetadata(
        query_start_loc=torch.arange(bs + 1, dtype=torch.int32, device=dev),
        seq_lens=seq_lens,
        block_tables=block_tables,
        slot_mapping=torch.full((bs,), -1, dtype=torch.int64, device=dev),
        query_lens_cpu=(1,) * bs,
        seq_lens_cpu=(capacity,) * bs,
        decode_chunk=torch.tensor([chunk], dtype=torch.int32, device=dev),
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


def _generate(path, prompts, news, graphs: bool, dtype: str, max_model_len: int = 4096):
    cfg = EngineConfig.from_dict(dict(
        model=str(path), device="cuda", dtype=dtype, attention="triton", prefill_chunk=1024,
        max_num_seqs=4, max_model_len=max_model_len, kv_cache_tokens=4 * max_model_len + 64,
        cuda_graphs=graphs, executor="local",
    ))  # fmt: skip
    engine = Engine(cfg)
    try:
        worker = engine.executor.worker
        assert worker.uses_cuda_graphs == graphs
        if graphs:
            assert set(worker._graphs.graphs) == {1}  # warm-up captured batch 1
        params = [SamplingParams(max_new_tokens=n) for n in news]
        outs = engine.generate(prompts, params, logits="sampled")
        captured = sorted(worker._graphs.graphs) if graphs else []
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
def test_graphs_match_eager_bfloat16(checkpoint):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (900, 60, 2500)]
    news = [12, 12, 12]
    on, captured = _generate(checkpoint, prompts, news, True, "bfloat16", max_model_len=8192)
    off, _ = _generate(checkpoint, prompts, news, False, "bfloat16", max_model_len=8192)
    assert 4 in captured
    for (tok_on, lg_on), (tok_off, lg_off) in zip(on, off):
        assert tok_on == tok_off
        scale = lg_off.abs().max().item()
        assert (lg_on - lg_off).abs().max().item() <= 2e-2 * scale
