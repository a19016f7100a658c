"""On a CUDA GPU: the ``efficient_cuda`` backend (torch's memory-efficient kernel over the paged
cache) against the float64 paged reference.

The portable backend's cases (ragged lengths, chunked prefill, ragged decode batches, decode,
prefill and chunk mixed in one call, GQA ratios 1, 4, 8) with blocks at shuffled ids (gathered)
and at consecutive ids (read in place), plus decode calls long enough to be split over the keys,
with and without a tail of left-over keys. Skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention import autotune, cuda_efficient
from runtime.attention.base import AttentionMetadata
from runtime.attention.cuda_efficient import CudaEfficientBackend
from runtime.attention.reference import reference_attention
from runtime.attention.registry import UnknownBackendError, get_backend, resolve_backend_name
from runtime.attention.torch_tiled import TorchTiledBackend
from runtime.attention.wmma_cuda import WmmaCudaBackend
from tests.test_attention_cpu_flash import consecutive_case
from tests.test_attention_torch import CASE_IDS, CASES, LAYOUTS, make_case, max_err, naive_attention

pytestmark = pytest.mark.gpu


def test_efficient_cuda_refuses_a_cpu_by_name():
    # runs everywhere: the device check needs no GPU
    reason = CudaEfficientBackend.supports(torch.device("cpu"))
    assert reason and "CUDA" in reason
    with pytest.raises(UnknownBackendError, match="efficient_cuda.*does not run on cpu"):
        resolve_backend_name("efficient_cuda", torch.device("cpu"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _on_gpu(q, kc, vc, meta):
    dev = torch.device("cuda")
    tables = [meta.block_tables[b].tolist() for b in range(meta.num_seqs)]
    bs = kc.shape[1]
    gmeta = AttentionMetadata.build(meta.query_lens_cpu, meta.seq_lens_cpu, tables, bs, dev)
    return q.to(dev), kc.to(dev), vc.to(dev), gmeta


@cuda
@pytest.mark.parametrize("layout", ["shuffled", "consecutive"])
@pytest.mark.parametrize("block_size,hq,hkv", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_efficient_cuda_matches_reference_fp32(case, block_size, hq, hkv, layout):
    build = make_case if layout == "shuffled" else consecutive_case
    q, kc, vc, meta = _on_gpu(*build(*case, hq, hkv, 32, block_size, seed=11))
    out, lse = CudaEfficientBackend().forward(q, kc, vc, meta, 32**-0.5)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 32**-0.5)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert max_err(out, ref_out) < 1e-4
    assert max_err(lse, ref_lse) < 1e-4


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASE_IDS)
def test_efficient_cuda_half_within_flash_rule(case, dtype):
    q, kc, vc, meta = _on_gpu(*make_case(*CASES[CASE_IDS.index(case)], 8, 2, 64, 16, dtype, 1))
    assert_within_half_rule(CudaEfficientBackend(), q, kc, vc, meta, lse_tol=1e-3)


def assert_within_half_rule(backend, q, kc, vc, meta, lse_tol: float) -> None:
    """Half inputs: ``backend``'s output within twice the textbook computation's error (in the
    inputs' dtype) of the float64 reference, its lse within ``lse_tol``."""
    scale = q.shape[-1] ** -0.5
    out, lse = backend.forward(q, kc, vc, meta, scale)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, scale)
    cpu = [x.cpu() for x in (q, kc, vc)]
    tables = [meta.block_tables[b].tolist() for b in range(meta.num_seqs)]
    cmeta = AttentionMetadata.build(meta.query_lens_cpu, meta.seq_lens_cpu, tables, kc.shape[1])
    naive = naive_attention(*cpu, cmeta, scale).to(out.device)
    assert out.dtype == q.dtype
    assert max_err(out, ref_out) <= 2 * max_err(naive, ref_out) + 1e-3
    assert max_err(lse, ref_lse) < lse_tol


@cuda
@pytest.mark.parametrize("min_split", [512, 64, 100000])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2), (32, 8)])
def test_efficient_cuda_split_decode(monkeypatch, min_split, hq, hkv):
    # one launch for the batch, split over the keys: one sequence in one run (4,099 keys, a
    # ragged last piece), one over three runs, one with no two blocks consecutive (a piece per
    # block), and a short one
    monkeypatch.setattr(cuda_efficient, "MIN_SPLIT_KEYS", min_split)
    seq_lens = [4099, 3000, 1500, 40]
    q, kc, vc, meta = consecutive_case([1] * 4, seq_lens, hq, hkv, 64, 16, seed=5)
    tables = [meta.block_tables[b, : -(-n // 16)].tolist() for b, n in enumerate(seq_lens)]
    t = tables[1]
    tables[1] = t[120:] + t[60:120] + t[:60]  # three runs
    spare = kc.shape[0]
    tables[2] = list(range(spare, spare + 2 * len(tables[2]), 2))  # no two blocks consecutive
    kc = torch.cat([kc, torch.randn(2 * len(tables[2]), 16, hkv, 64)])
    vc = torch.cat([vc, torch.randn(2 * len(tables[2]), 16, hkv, 64)])
    meta = AttentionMetadata.build([1] * 4, seq_lens, tables, 16)
    q, kc, vc, meta = _on_gpu(q, kc, vc, meta)
    backend = CudaEfficientBackend()
    out, lse = backend.forward(q, kc, vc, meta, 0.125)
    plan = backend._decode_cached
    runs = 1 + 3 + len(tables[2]) + 1
    assert plan.pieces > runs if min_split < 4099 else plan.pieces == runs
    assert plan.lens.sum().item() == sum(seq_lens)
    ref_out, ref_lse = reference_attention(q, kc, vc, meta, 0.125)
    assert max_err(out, ref_out) < 1e-4 and max_err(lse, ref_lse) < 1e-4
    # large logits: the merge of the pieces keeps exp finite
    out, lse = backend.forward(q * 30, kc, vc, meta, 0.125)
    ref_out, ref_lse = reference_attention(q * 30, kc, vc, meta, 0.125)
    assert torch.isfinite(out).all() and max_err(out, ref_out) < 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-4)


@cuda
def test_efficient_cuda_registry_and_auto():
    dev = torch.device("cuda")
    assert isinstance(get_backend("efficient_cuda", dev), CudaEfficientBackend)
    assert CudaEfficientBackend.supports(dev) is None
    assert resolve_backend_name("efficient_cuda", dev) == "efficient_cuda"
    # what auto measures on a GPU without the Triton kernels: both candidates exact here
    assert autotune.candidates_for(dev) == ("efficient_cuda", "wmma_cuda", "torch")
    for dtype in (torch.float32, torch.bfloat16):
        shape = autotune.AttentionShape(32, 8, 128, dtype, 16)
        backends = {"efficient_cuda": CudaEfficientBackend(), "torch": TorchTiledBackend()}
        if WmmaCudaBackend.supports(dev) is None:  # built with nvcc where there is one
            backends["wmma_cuda"] = WmmaCudaBackend()
        choice = autotune.choose_backend(shape, backends, dev)
        assert set(choice.ms) == set(backends), choice.reason
        assert choice.reason.startswith("auto: fastest exact on this cuda device")


@pytest.mark.parametrize("seq", [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 2], [0]])
def test_decode_plan_merges_pieces_exactly(seq):
    # runs everywhere: the merge of a decode plan's pieces (equal counts per sequence: reshapes;
    # unequal: padded) against a direct log-sum-exp merge of each sequence's pieces
    pieces, num_seqs, group, hkv, d = len(seq), max(seq) + 1, 2, 3, 4
    plan = cuda_efficient._DecodePlan(
        seq, list(range(pieces)), [1] * pieces, num_seqs, group, "cpu"
    )
    g = torch.Generator().manual_seed(3)
    o = torch.randn(pieces, group, hkv, d, generator=g)
    lse = torch.randn(pieces, hkv, group, generator=g) * 20
    out, total = plan.merge(o, lse, num_seqs)
    for b in range(num_seqs):
        idx = [i for i, x in enumerate(seq) if x == b]
        ref_lse = torch.logsumexp(lse[idx].double(), 0)
        w = torch.exp(lse[idx].double() - ref_lse).transpose(1, 2).unsqueeze(-1)
        assert max_err(out[b], (o[idx].double() * w).sum(0)) < 1e-5
        assert max_err(total[b], ref_lse) < 1e-5
