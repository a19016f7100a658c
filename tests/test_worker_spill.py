"""A real Worker (tiny Llama, CPU) over a two-tier KV cache: the same steps with blocks spilled to
the host, fetched back and re-used in the same step give the logits and greedy tokens of the
all-device run, for the stream and cooperate modes and with a staging area that is too small."""

from __future__ import annotations

import pytest
import torch

from runtime.loader import resolve_model
from runtime.worker import Worker
from runtime.worker_config import WorkerConfig
from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.config import SchedulerConfig
from scheduler.request import SamplingParams

GREEDY = SamplingParams(max_new_tokens=8)
BS = 4


def make_worker(attention: str, device_blocks: int, host_blocks: int, spill: str, staging=None):
    source = resolve_model("tiny")
    limits = SchedulerConfig(block_size=BS).for_model(source.config.max_position_embeddings)
    w = Worker(WorkerConfig(model="tiny", device="cpu", attention=attention), source, limits)
    w.init_device()
    w.load_model()
    w._spill_option = lambda name, default: spill if name == "spill" else default
    if staging is not None:
        w._staging_blocks = lambda d: staging
    w.init_kv_cache(device_blocks, host_blocks)
    for t in (w.kv.k_all, w.kv.v_all):  # block 0 aside, memory is garbage: make it loud
        t[1:].fill_(float("nan"))
    for k, v in w.kv.layers:
        k[0].zero_()
        v[0].zero_()
    return w


def schedule(D: int | None):
    """The steps of two sequences; with ``D`` (device blocks) the spilled variant."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randint(0, 512, (40,), generator=g).tolist()
    p1 = torch.randint(0, 512, (9,), generator=g).tolist()
    h = (lambda i: D + i) if D is not None else None
    # seq 0 uses device blocks 0..10 (all-device run), seq 1 blocks 12..14
    t0 = list(range(11))
    t1 = [12, 13, 14]
    steps = []
    steps.append(([(0, p0[:24], 0, t0[:6], False), (1, p1, 0, t1, True)], ()))
    if D is None:
        steps.append(([(0, p0[24:], 24, t0[:10], True)], ()))
        for _ in range(3):
            steps.append(([(0, None, None, t0, True), (1, None, None, t1, True)], ()))
        return steps
    # spill seq 0's blocks 1..4 and write the chunk into the very same device blocks
    spilled = [0, h(0), h(1), h(2), h(3), 5, 1, 2, 3, 4]
    steps.append(([(0, p0[24:], 24, spilled, True)], ((1, h(0)), (2, h(1)), (3, h(2)), (4, h(3)))))
    a = spilled + [6]
    steps.append(([(0, None, None, a, True), (1, None, None, [h(6), 13, 14], True)], ((12, h(6)),)))
    b = [0, h(0), 7, h(2), h(3), 5, 1, 2, 3, 4, 6]  # fetch h(1) back into device block 7
    steps.append(([(0, None, None, b, True), (1, None, None, [h(6), 13, 14], True)], ((h(1), 7),)))
    c = [0, h(0), 7, h(2), h(3), h(4), 1, 2, 3, 4, 6]  # spill block 5 as well
    steps.append(([(0, None, None, c, True), (1, None, None, [h(6), 13, 14], True)], ((5, h(4)),)))
    return steps


def run(worker: Worker, steps):
    """Execute the steps, feeding each sequence its own sampled tokens; logits of every row."""
    pos = {}
    last = {}
    out = []
    for n, (chunks, swaps) in enumerate(steps):
        built = []
        for sid, tokens, start, table, sample in chunks:
            if tokens is None:  # decode: the token sampled last
                tokens, start = [last[sid]], pos[sid]
            built.append(SeqChunk(sid, tuple(tokens), start, tuple(table), sample, GREEDY))
            pos[sid] = start + len(tokens)
        r = worker.execute(ScheduledBatch(n, tuple(built), swaps=swaps), logits="all")
        last.update(r.sampled)
        out.append(r)
    return out


@pytest.mark.parametrize(
    "spill,staging",
    [("stream", None), ("cooperate", None), ("stream", 2)],
    ids=["stream", "cooperate", "stream-small-staging"],
)
@pytest.mark.parametrize("attention", ["torch", "sdpa"])
def test_spilled_run_equals_all_device_run(attention, spill, staging):
    ref = run(make_worker(attention, 16, 0, "auto"), schedule(None))
    D = 64
    got = run(make_worker(attention, D, 16, spill, staging), schedule(D))
    for n, (a, b) in enumerate(zip(ref, got)):
        assert a.sampled == b.sampled, n
        for sid in a.logits:
            assert torch.isfinite(b.logits[sid]).all()
            assert torch.allclose(a.logits[sid], b.logits[sid], atol=1e-5, rtol=1e-5), (n, sid)
    assert [r.spill_mode for r in got[1:]] == (
        ["stream"] * 4 if spill == "stream" else ["cooperate"] * 4
    )
    assert all(r.bytes_moved > 0 for r in got[1:])
    assert got[0].spill_mode == "none" and got[0].bytes_moved == 0


def test_tier_sizes_from_flags_and_defaults():
    from runtime.worker_config import WorkerConfig
    from scheduler.errors import ConfigError

    def capacity(**kw):
        source = resolve_model("tiny")
        limits = SchedulerConfig(block_size=BS).for_model(source.config.max_position_embeddings)
        w = Worker(WorkerConfig(model="tiny", device="cpu", **kw), source, limits)
        w.init_device()
        return w.kv_cache_capacity()

    assert capacity(kv_cache_tokens=64, kv_host_tokens=4096) == {
        "device_blocks": 16,
        "host_blocks": 1024,
    }
    assert capacity(kv_cache_tokens=64)["host_blocks"] == 0  # a CPU device: no automatic tier
    assert capacity(kv_cache_tokens=64, kv_host_tokens=0)["host_blocks"] == 0
    auto = capacity()  # sized from memory (below what 8 seats of the context could use)
    assert auto["device_blocks"] > 1 and auto["host_blocks"] == 0
    with pytest.raises(ConfigError, match="spill=off leaves no host tier but kv_host_tokens=8"):
        WorkerConfig(spill="off", kv_host_tokens=8)
    with pytest.raises(ConfigError, match="kv_host_dtype='fp4' is not valid"):
        WorkerConfig(kv_host_dtype="fp4")


def test_measured_rates_feed_the_cost_model():
    from runtime.attention.partial import CPU_METHODS
    from runtime.attention.registry import get_backend
    from runtime.spill_rates import measure_rates

    rates = measure_rates(
        get_backend("torch", "cpu"),
        torch.device("cpu"),
        torch.float32,
        4,
        2,
        16,
        4,
        keys=256,
        queries=16,
        prefill_queries=64,
        link_bytes=1 << 20,
        cpu_keys=512,
        run_tokens=128,
    )
    assert rates.spill.known
    # every method was timed on the step's own path, and the step gets one of them
    assert set(rates.cpu.tried) == set(CPU_METHODS)
    assert rates.cpu.method in CPU_METHODS
    assert rates.spill.cpu_bytes_per_s == rates.cpu.tried[rates.cpu.method]


def test_device_flop_rate_is_taken_at_a_prefill_chunks_shape(monkeypatch):
    """The cost model weighs long prefill chunks with the device's FLOP rate: measured with a
    few hundred queries (a fraction of a GPU busy) it was 2-4x low, and the model handed the
    CPU a share of 8K-query chunks it then waited for (H200, 8B shape at 512K)."""
    from runtime.attention.registry import get_backend
    from runtime.spill_rates import measure_rates

    backend = get_backend("torch", "cpu")
    seen = []
    forward = backend.forward

    def recording(q, k, v, meta, scale):
        seen.append((q.shape[0], int(meta.seq_lens_cpu[0])))
        return forward(q, k, v, meta, scale)

    monkeypatch.setattr(backend, "forward", recording)
    measure_rates(
        backend, torch.device("cpu"), torch.float32, 4, 2, 16, 4, keys=64, queries=16,
        prefill_queries=96, link_bytes=1 << 20, cpu_keys=512, run_tokens=128,
    )  # fmt: skip
    # decode (one query) and the prefill chunk: 96 queries at the end of 2 x 96 keys
    assert set(seen) == {(1, 192), (96, 192)}


def _h100_7b_worker(monkeypatch, max_model_len=262_144, max_num_seqs=8, **kw):
    """A Worker of the 7B shape (bf16, block 16, 32 layers) whose memory queries answer like an
    80 GB H100 with the weights loaded (66 GB free); the sizing arithmetic is the real one."""
    from runtime import device as dev
    from runtime.device import DeviceInfo

    source = resolve_model("llama2-7b")
    limits = SchedulerConfig(block_size=16, max_num_seqs=max_num_seqs)
    limits = limits.for_model(max_model_len).for_device("cuda")
    w = Worker(WorkerConfig(model="llama2-7b", device="cpu", **kw), source, limits)
    w.device, w.dtype = torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(dev, "free_memory_bytes", lambda d: 66 * 10**9)
    monkeypatch.setattr(
        dev, "device_info", lambda d: DeviceInfo("cuda", "H100", (9, 0), 80 * 10**9)
    )
    return w


def test_staging_holds_the_host_part_of_a_256k_context_of_the_7b_shape(monkeypatch):
    # automatic device tier, a host tier of ~156K tokens: one staging buffer holds all of it
    host_tokens = 156 * 1024
    w = _h100_7b_worker(monkeypatch, kv_host_tokens=host_tokens)
    cap = w.kv_cache_capacity()
    d, h = cap["device_blocks"], cap["host_blocks"]
    assert 90_000 <= d * 16 <= 110_000 and h * 16 == host_tokens
    staging = min(h, w._staging_blocks(d))
    assert staging == h
    # the pool, both buffers (one layer per staged block) and the activations fit the budget
    per = w.kv_bytes_per_block()
    used = d * per + 2 * staging * per / 32 + w._activation_bytes()
    assert used <= 66 * 10**9 - 0.1 * 80 * 10**9


def test_automatic_tiers_stop_at_what_the_seats_can_use(monkeypatch):
    from runtime import device as dev

    # a host with 200 GB available: the automatic host tier would take ~390K blocks of the 7B
    monkeypatch.setattr(dev, "host_memory_bytes", lambda: (200 * 10**9, 256 * 10**9))

    def capacity(**kw):
        w = _h100_7b_worker(monkeypatch, **kw)
        w.device = torch.device("cuda")  # an accelerator: the host tier is sized automatically
        return w.kv_cache_capacity()

    # one 4K-token task at a time: 256 blocks (+1 kept free), not the ~6K the device would hold
    assert capacity(max_model_len=4096, max_num_seqs=1) == {"device_blocks": 257, "host_blocks": 0}
    # one 256K-token task: the device tier from memory, the host tier up to what the task needs
    cap = capacity(max_num_seqs=1)
    assert 5_000 < cap["device_blocks"] < 7_000
    assert cap["device_blocks"] + cap["host_blocks"] == 262_144 // 16 + 1
    # eight seats of 256K: the host tier is then bound by host memory, not by the seats
    assert capacity()["host_blocks"] > cap["host_blocks"]
    # sizes the user gives are kept
    forced = capacity(max_model_len=4096, max_num_seqs=1, kv_cache_tokens=64 * 1024,
                      kv_host_tokens=1024)  # fmt: skip
    assert forced == {"device_blocks": 4096, "host_blocks": 64}


def test_forced_device_tier_stages_from_the_free_memory_left(monkeypatch):
    # --kv-cache-tokens 16384 at 64K: the 3072 host blocks of one layer all fit one buffer (the
    # share of the small pool, 16384 / 16 x 32 / 16 = 2048 blocks, would not)
    w = _h100_7b_worker(monkeypatch, kv_cache_tokens=16_384, kv_host_tokens=48 * 1024)
    cap = w.kv_cache_capacity()
    assert cap == {"device_blocks": 1024, "host_blocks": 3072}
    assert min(cap["host_blocks"], w._staging_blocks(1024)) == 3072
    # no free memory left: the staging area shrinks (rounds take the rest), never below one block
    from runtime import device as dev

    monkeypatch.setattr(dev, "free_memory_bytes", lambda d: 10 * 10**9)
    assert w._staging_blocks(1024) == 1


def test_a_cpu_method_this_torch_refuses_is_left_out(monkeypatch):
    """A fused kernel that raises on this torch never becomes the step's method."""
    import runtime.spill_rates as spill_rates

    real = spill_rates.host_attention

    def refusing(q, k, v, scale, method="fused"):
        if method.startswith("fused"):
            raise RuntimeError("no such kernel here")
        return real(q, k, v, scale, method)

    monkeypatch.setattr(spill_rates, "host_attention", refusing)
    rate = spill_rates.cpu_attention_rate(4, 2, 16, torch.float32, keys=256, run_tokens=64)
    assert rate.method == "tiled" and set(rate.tried) == {"tiled"}


@pytest.mark.parametrize("quant", ["fp8", "int8"])
def test_cpu_rate_of_an_8bit_host_tier_times_the_dequantization_and_counts_stored_bytes(
    monkeypatch, quant
):
    """On an H200 the cost model, fed the bf16 rate for an fp8 host tier, sent decode steps to
    the CPU at 55x their bound: the CPU part dequantizes every block before it attends. The
    rate must time that too, per stored byte (what ``StepShape.host_bytes`` counts)."""
    import runtime.spill_rates as spill_rates

    calls = []
    real = spill_rates.kv_quant.dequantize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(spill_rates.kv_quant, "dequantize", counting)
    monkeypatch.setattr(spill_rates, "best_time", lambda fn, device, repeats=3: (fn(), 1.0)[1])
    keys, hkv, d, bs = 256, 2, 16, 16
    rate = spill_rates.cpu_attention_rate(
        4, hkv, d, torch.bfloat16, keys=keys, run_tokens=64, methods=("tiled",), quant=quant,
        block_size=bs,
    )  # fmt: skip
    stored = 2 * keys * hkv * d + 2 * (keys // bs) * 4  # K and V bytes + a float32 scale a block
    assert rate.bytes_per_s == stored  # one second per call: the rate is the bytes counted
    assert len(calls) == 2 * (keys // 64)  # every run of K and V dequantized inside the timing
