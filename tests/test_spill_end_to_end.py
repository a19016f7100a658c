"""KV spill to host end to end (issue #10): real workers, a tiny device pool that forces blocks to
the host, the same greedy tokens and logits as the run with everything on the device, and as
transformers on the same safetensors weights.

Tests that take more than a few seconds on two cores are marked slow (the fast lane keeps the
capacity error and the scheduler's own simulated tests in tests/test_spill_scheduler.py).

A device tier of 128 tokens (8 blocks of 16) under prompts of up to 300 tokens: the scheduler
spills the oldest middle blocks during chunked prefill, every later step attends over host blocks
(``stream`` or ``cooperate``), and with more tasks than the device holds one is preempted (its
blocks go to the host) and resumed.
"""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.hf_models import hf_greedy, make_hf_llama

SPILL = dict(block_size=16, kv_cache_tokens=128, kv_host_tokens=4096)
PLAIN = dict(block_size=16, kv_cache_tokens=4096, kv_host_tokens=0, spill="off")
NEW = 24
LOGIT_ATOL = 1e-4  # float32; only the summation order over tiles differs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_spill")
    return d, make_hf_llama(d, "gqa", max_position_embeddings=1024)


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(path, executor="local", **kw) -> LLM:
    cfg = dict(model=str(path), device="cpu", dtype="float32", attention="torch")
    cfg.update(prefill_chunk=64, max_model_len=512, max_num_seqs=4)
    cfg.update(kw)
    return LLM(executor=executor, **cfg)


def _gen(llm: LLM, prompts, new=NEW, logits="all"):
    return llm.engine.generate(prompts, SamplingParams(max_new_tokens=new), logits=logits)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Each prompt alone with every block on the device: tokens and every row's logits."""
    path, hf = ckpt
    prompts = [_prompt(n, hf.config.vocab_size, seed=n) for n in (300, 150, 17)]
    with _llm(path, **PLAIN) as llm:
        assert llm.engine.num_host_blocks == 0
        outs = [_gen(llm, [p])[0] for p in prompts]
    assert outs[0].token_ids == hf_greedy(hf, prompts[0], NEW)
    return prompts, outs


@pytest.mark.slow
def test_spilled_logits_match_transformers(ckpt, reference):
    path, hf = ckpt
    prompts, _ = reference
    with _llm(path, **SPILL, spill="auto") as llm:
        out = _gen(llm, [prompts[1]])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompts[1] + out.token_ids[:-1]])).logits[0].float()
    assert (out.metrics["logits"] - ref).abs().max().item() < 2e-4
    assert out.token_ids == hf_greedy(hf, prompts[1], NEW)
    assert out.metrics["kv"]["blocks_spilled"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stream", "cooperate"])
def test_spilled_run_equals_all_on_device(ckpt, reference, mode):
    path, _ = ckpt
    prompts, ref = reference
    with _llm(path, **SPILL, spill=mode) as llm:
        assert (llm.engine.executor.num_blocks, llm.engine.num_host_blocks) == (8, 256)
        assert "KV cache: device 8 blocks, host 256 blocks" in llm.ready_line
        for p, r in zip(prompts, ref):
            out = _gen(llm, [p])[0]
            assert out.token_ids == r.token_ids
            err = (out.metrics["logits"] - r.metrics["logits"]).abs().max().item()
            assert err < LOGIT_ATOL, f"prompt {len(p)}: max |logit diff| {err}"
        kv = out.metrics["kv"]
        # the 17-token prompt fits the device; the 300-token one above spilled
        assert kv["device_blocks"] == 8 and kv["host_blocks"] == 256
        first = _gen(llm, [prompts[0]], new=2, logits="none")[0].metrics["kv"]
        assert first["blocks_spilled"] > 0 and first["bytes_moved"] > 0
        attended = {m: n for m, n in first["modes"].items() if m != "none"}
        assert attended and set(attended) <= {"stream", "cooperate"}, first["modes"]
        if mode == "cooperate":
            assert "cooperate" in attended
        # stream: blocks beyond the staging area (D x layers / 16 blocks: one, here) stream in
        # rounds on the device; only cooperate puts any on the CPU
        if mode == "stream":
            assert "cooperate" not in attended, first["modes"]
        assert first["bytes_moved_per_step"] == first["bytes_moved"] / first["steps"]
        # by kind and mode: every step counted once, the CPU's blocks only where it cooperated
        kinds = first["by_kind"]
        assert sum(k["steps"] for k in kinds.values()) == first["steps"]
        assert {key.split("/")[0] for key in kinds} == {"prefill", "decode"}
        for key, k in kinds.items():
            assert k["seconds"] > 0 and (k["cpu_blocks"] > 0) == key.endswith("cooperate"), kinds
            assert (k["host_blocks"] > 0) == (not key.endswith("none")), kinds


@pytest.mark.slow
def test_auto_times_its_cooperate_picks_and_keeps_the_tokens(ckpt, reference, monkeypatch):
    """Where the cost model picks cooperate under ``auto`` (forced here: on a CPU device auto
    always streams), the worker goes through its candidates (that share, half of it, stream)
    until it has timed each (``runtime.spill_tuner``), then runs the fastest: the same tokens
    and logits either way."""
    from runtime.worker import Worker
    from scheduler import spill_cost

    real = spill_cost.choose

    def model_says_cooperate(shape, rates, forced="auto"):
        if forced == "auto" and shape.host_bytes:
            return spill_cost.SpillChoice("cooperate", 0.5, 1e-3)
        return real(shape, rates, forced)

    monkeypatch.setattr(spill_cost, "choose", model_says_cooperate)
    monkeypatch.setattr(Worker, "_auto_may_cooperate", lambda self: True)
    path, _ = ckpt
    prompts, ref = reference
    with _llm(path, **SPILL, spill="auto") as llm:
        out = _gen(llm, [prompts[0]])[0]
        timed = llm.engine.executor.worker.spill_tuner.summary()
    assert out.token_ids == ref[0].token_ids
    err = (out.metrics["logits"] - ref[0].metrics["logits"]).abs().max().item()
    assert err < LOGIT_ATOL, f"max |logit diff| {err}"
    decode = [t for kind, t in timed.items() if ", True," in kind]
    assert decode and all(set(t) == {"cooperate", "cooperate-half", "stream"} for t in decode)
    modes = out.metrics["kv"]["modes"]
    assert modes.get("cooperate", 0) > 0 and modes.get("stream", 0) > 0, modes


@pytest.mark.slow
def test_batched_requests_with_spill_equal_each_alone(ckpt, reference):
    path, _ = ckpt
    prompts, ref = reference
    with _llm(path, **SPILL, spill="auto") as llm:
        outs = _gen(llm, prompts, logits="none")
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


@pytest.mark.slow
def test_preempted_request_resumes_with_identical_tokens(ckpt):
    """Six decoding tasks, eight device blocks of which each task's last block must be one:
    tasks are paused (their blocks to the host) and resumed, tokens as if alone."""
    path, hf = ckpt
    prompts = [_prompt(20 + 7 * i, hf.config.vocab_size, seed=50 + i) for i in range(6)]
    with _llm(path, **PLAIN, max_num_seqs=6) as llm:
        alone = [_gen(llm, [p], logits="none")[0].token_ids for p in prompts]
    tiny = dict(SPILL, kv_cache_tokens=64)  # 4 device blocks for 6 tasks
    with _llm(path, **tiny, max_num_seqs=6, spill="stream") as llm:
        outs = _gen(llm, prompts, logits="none")
    assert [o.token_ids for o in outs] == alone
    assert outs[0].metrics["kv"]["preemptions"] > 0


def test_request_larger_than_both_tiers_names_what_fits(ckpt):
    from scheduler.errors import CapacityError

    path, hf = ckpt
    with _llm(path, block_size=16, kv_cache_tokens=64, kv_host_tokens=128) as llm:
        with pytest.raises(CapacityError, match=r"176 tokens fit .*--kv-host-tokens"):
            _gen(llm, [_prompt(200, hf.config.vocab_size, 1)], new=4, logits="none")
        ok = _gen(llm, [_prompt(100, hf.config.vocab_size, 1)], new=4, logits="none")[0]
        assert len(ok.token_ids) == 4  # nothing was disturbed


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("comm", ["gloo", "mpi"])
def test_tp2_with_spill_matches_tp1_all_on_device(ray_cluster, ckpt, reference, comm):
    path, _ = ckpt
    prompts, ref = reference
    with _llm(path, executor="ray", tp=2, comm=comm, **SPILL, spill="stream") as llm:
        out = _gen(llm, [prompts[0]])[0]
    assert out.token_ids == ref[0].token_ids
    assert (out.metrics["logits"] - ref[0].metrics["logits"]).abs().max().item() < LOGIT_ATOL
    assert out.metrics["kv"]["blocks_spilled"] > 0


def _cli(*args: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cluster.cli", "run", "--executor", "local", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_spill_flags_same_tokens_json_metrics_and_ready_line(ckpt):
    import json

    path, hf = ckpt
    ids = ",".join(map(str, _prompt(200, hf.config.vocab_size, seed=3)))
    base = ("--model", str(path), "--device", "cpu", "--dtype", "float32",
            "--prompt-token-ids", ids, "--max-new-tokens", "8", "--prefill-chunk", "64")  # fmt: skip
    plain = _cli(*base, "--spill", "off", "--json")
    spilled = _cli(*base, "--block-size", "16", "--kv-cache-tokens", "128",
                   "--kv-host-tokens", "4096", "--spill", "cooperate", "--json")  # fmt: skip
    assert plain.returncode == 0 and spilled.returncode == 0, plain.stderr + spilled.stderr
    p, s = json.loads(plain.stdout), json.loads(spilled.stdout)
    assert s["token_ids"] == p["token_ids"]
    kv = s["metrics"]["kv"]
    assert (kv["device_blocks"], kv["host_blocks"]) == (8, 256)
    assert kv["blocks_spilled"] > 0 and kv["bytes_moved"] > 0 and kv["exposed_move_s"] >= 0
    assert p["metrics"]["kv"]["host_blocks"] == 0 and p["metrics"]["kv"]["bytes_moved"] == 0
    text = _cli(*base, "--block-size", "16", "--kv-cache-tokens", "128",
                "--kv-host-tokens", "4096")  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert "KV cache: device 8 blocks, host 256 blocks" in text.stderr
    assert "KV cache: device 8 blocks, host 256 blocks" in text.stdout  # the summary line
    too_big = _cli(*base, "--kv-cache-tokens", "64", "--kv-host-tokens", "64")
    assert too_big.returncode == 2
    assert "tokens fit" in too_big.stderr and "--kv-host-tokens" in too_big.stderr
    assert "Traceback" not in too_big.stderr


@pytest.mark.slow
def test_seeded_random_placements_never_change_tokens(ckpt, reference):
    """Real worker, the scheduler's placement knobs drawn at random: the same tokens."""
    import random

    from scheduler.spill import SpillScheduler

    path, _ = ckpt
    prompts, ref = reference
    with _llm(path, **SPILL, spill="auto") as llm:
        eng = llm.engine
        for seed in range(3):
            rng = random.Random(seed)
            eng.scheduler = SpillScheduler(
                eng.scheduler.config,
                rng.randint(4, 8),  # a device tier smaller than the workers' is still valid
                eng.num_host_blocks,
                sink_blocks=rng.randint(0, 3),
                recent_blocks=rng.randint(0, 4),
            )
            order = rng.sample(range(len(prompts)), len(prompts))
            outs = _gen(llm, [prompts[i] for i in order], logits="none")
            assert [o.token_ids for o in outs] == [ref[i].token_ids for i in order], seed


def test_host_tier_pins_only_once_a_task_fills_the_device_tier(ckpt, monkeypatch):
    """Pinning the host tier contends with start-up's CUDA calls (a 7B worker on an H200 was
    ready 2-3 s later with it), and a short task never needs it: the pool's background thread
    is asked for chunks ahead of use only once a step's sequences hold a quarter of the device
    tier, or blocks move; a short prompt asks for nothing."""
    from runtime.host_pool import HostPool

    asked = []
    real = HostPool.pin_ahead
    monkeypatch.setattr(HostPool, "pin_ahead", lambda self: (asked.append(1), real(self)))
    path, hf = ckpt
    with _llm(path, **SPILL, spill="stream") as llm:  # device tier: 8 blocks of 16 tokens
        worker = llm.engine.executor.worker
        _gen(llm, [_prompt(20, hf.config.vocab_size, seed=1)], new=4, logits="none")
        assert not asked and not worker._host_pinning
        _gen(llm, [_prompt(40, hf.config.vocab_size, seed=2)], new=2, logits="none")
        assert asked and worker._host_pinning  # 40 of 128 device tokens: a quarter
        # the spill cost model's rates: measured where it decides, never on a CPU device
        assert worker.spill_rates is None
