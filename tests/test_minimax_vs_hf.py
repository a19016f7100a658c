"""A MiniMax-style hybrid (lightning and softmax attention, a mixture of experts) against
transformers' ``MiniMaxForCausalLM`` on the same safetensors weights (float32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine import Engine
from runtime.config import ModelConfig
from scheduler.errors import ConfigError
from scheduler.request import SamplingParams
from tests.hf_models import hf_greedy, make_hf_minimax

pytest.importorskip("transformers.models.minimax")

LOGIT_ATOL = 2e-4
NEW_TOKENS = 24
PROMPT_LENS = (1, 17, 113, 150)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("minimax")
    return d, make_hf_minimax(d)


def _engine(path, **kw) -> Engine:
    cfg = dict(model=str(path), device="cpu", dtype="float32", attention="torch")
    cfg.update(prefill_chunk=64, block_size=16, max_model_len=1024, executor="local")
    cfg.update(kw)
    return Engine(EngineConfig.from_dict(cfg))


def _prompt(n: int, seed: int, vocab: int = 384) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _matches_hf(engine: Engine, hf, prompt: list[int], atol: float = LOGIT_ATOL):
    """Generate NEW_TOKENS for ``prompt``: every logit row within ``atol`` of transformers' (on
    the CPU) on the same tokens, and the same greedy tokens. Returns the output."""
    out = engine.generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS), logits="all")[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids[:-1]])).logits[0].float()
    err = (out.metrics["logits"].cpu() - ref).abs().max().item()
    assert err < atol, f"prompt {len(prompt)}: max |logit diff| {err}"
    assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt {len(prompt)}"
    return out


@pytest.mark.parametrize("attention", ["torch", "flash_cpu"])
def test_logits_and_greedy_tokens_match_transformers(checkpoint, attention):
    """Prompts of 1 to 150 tokens in chunks of 64 (a lightning layer continues from its state
    across chunks), then 24 decoded tokens: every logit row and every greedy token."""
    path, hf = checkpoint
    engine = _engine(path, attention=attention)
    for n in PROMPT_LENS:
        _matches_hf(engine, hf, _prompt(n, seed=n))
    engine.shutdown()


def test_batch_equals_each_alone_and_states_are_reused(checkpoint):
    """Sequences of a batch keep their own states; a finished sequence's slot serves the next
    one from zero (more requests than seats)."""
    path, _ = checkpoint
    engine = _engine(path, prefill_chunk=48, max_num_seqs=2)
    prompts = [_prompt(n, seed=100 + n) for n in (5, 70, 33, 120)]
    params = SamplingParams(max_new_tokens=12)
    together = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
    # 8 sequences through 3 slots (2 seats, 1 for warm-up; then the graphs' scratch slot):
    # slots were given back and reused;
    # still held: warm-up's and the last sequence's (a finish reaches the worker with the next
    # step)
    states = engine.executor.worker.model.states
    assert len(states.layers[0]) == 4 and states.scratch == 3 and len(states._slot) <= 2
    engine.shutdown()


def test_chunked_prefill_equals_one_shot(checkpoint):
    path, _ = checkpoint
    prompt = _prompt(150, seed=7)
    params = SamplingParams(max_new_tokens=1)
    chunked = _engine(path, prefill_chunk=32).generate([prompt], params, logits="all")[0]
    whole = _engine(path, prefill_chunk=512).generate([prompt], params, logits="all")[0]
    # float32 rounding: chunk boundaries change the order of the lightning state sums (1.06e-4
    # on an Intel Xeon where an AMD EPYC gave under 1e-4)
    diff = (chunked.metrics["logits"] - whole.metrics["logits"]).abs().max().item()
    assert diff < LOGIT_ATOL
    assert chunked.token_ids == whole.token_ids


@pytest.mark.ray
@pytest.mark.slow
def test_ray_actor_matches_in_process(ray_cluster, checkpoint):
    path, _ = checkpoint
    prompts = [_prompt(90, seed=1), _prompt(9, seed=2)]
    params = SamplingParams(max_new_tokens=10)
    local = _engine(path)
    want = [o.token_ids for o in local.generate(prompts, params)]
    local.shutdown()
    remote = _engine(path, executor="ray")
    got = [o.token_ids for o in remote.generate(prompts, params)]
    remote.shutdown()
    assert got == want


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("comm, expert_parallel", [("gloo", False), ("mpi", False), ("gloo", True)])
def test_tensor_parallel_matches_transformers(ray_cluster, checkpoint, comm, expert_parallel):
    """TP = 2 over Ray actors: each rank holds half the heads of every layer (lightning states
    and decay rates included) and half of every expert, or with expert parallelism two whole
    experts of four; the lightning norm's sums of squares and the experts' outputs are summed
    over the ranks. Every logit row and every token."""
    if comm == "mpi":
        pytest.importorskip("mpi4py")
    path, hf = checkpoint
    engine = _engine(path, executor="ray", tp=2, comm=comm, expert_parallel=expert_parallel)
    for n in (17, 150):
        _matches_hf(engine, hf, _prompt(n, seed=n))
    engine.shutdown()


def test_expert_parallel_needs_experts_that_split_over_the_ranks(tmp_path):
    # refused on the driver: 3 experts over 2 ranks, and a model with no experts at all
    make_hf_minimax(tmp_path, num_local_experts=3)
    with pytest.raises(ConfigError, match="tp=2 does not divide the model's num_local_experts=3"):
        _engine(tmp_path, tp=2, executor="ray", expert_parallel=True)
    with pytest.raises(ConfigError, match="expert_parallel: the model .llama. has no mixture"):
        _engine("demo-small", tp=2, executor="ray", expert_parallel=True)


def test_tensor_parallel_sizes_must_divide_the_heads(checkpoint):
    path, _ = checkpoint
    # refused on the driver, before a Ray cluster would start (2 KV heads over 4 ranks)
    with pytest.raises(ConfigError, match="tp=4 does not divide the model's num_key_value_heads"):
        _engine(path, tp=4, executor="ray")


SPILL = dict(block_size=16, kv_cache_tokens=128, kv_host_tokens=4096)


@pytest.mark.parametrize("mode", ["stream", "cooperate", "auto"])
def test_spilled_kv_beside_lightning_states_matches_transformers(checkpoint, mode):
    """The softmax layers' KV cache over two tiers (8 device blocks for a 300-token prompt):
    blocks spill to host and come back, or the CPU attends over them, while the lightning
    layers' states stay in their slots. Every logit row and every token."""
    path, hf = checkpoint
    engine = _engine(path, **SPILL, spill=mode)
    out = _matches_hf(engine, hf, _prompt(300, seed=3))
    assert out.metrics["kv"]["blocks_spilled"] > 0
    engine.shutdown()


def test_preempted_sequences_keep_their_states(checkpoint):
    """Six sequences, four device blocks: sequences are paused (their KV blocks to the host,
    their lightning states left in their slots) and resumed, with the tokens each gets alone."""
    path, _ = checkpoint
    prompts = [_prompt(20 + 7 * i, seed=50 + i) for i in range(6)]
    params = SamplingParams(max_new_tokens=12)
    plain = _engine(path, max_num_seqs=6)
    alone = [plain.generate([p], params)[0].token_ids for p in prompts]
    plain.shutdown()
    engine = _engine(path, **dict(SPILL, kv_cache_tokens=64), max_num_seqs=6, spill="stream")
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == alone
    assert outs[0].metrics["kv"]["preemptions"] > 0
    engine.shutdown()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"layer_types": ["linear_attention"] * 4}, "no full_attention layer"),
        ({"layer_types": ["full_attention"] * 3}, "one type per layer"),
        ({"layer_types": ["mamba"] + ["full_attention"] * 3}, "unknown \\['mamba'\\]"),
        ({"num_experts_per_tok": 9}, "exceeds num_local_experts=4"),
        ({"sliding_window": 128}, "sliding_window=128"),
    ],
)
def test_bad_minimax_config_is_one_clear_line(checkpoint, tmp_path, change, match):
    path, _ = checkpoint
    d = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(tmp_path)


def test_checkpoint_script_writes_what_tilerun_runs(tmp_path):
    """``scripts/minimax_checkpoint.py`` (the README's way to try the lightning path) writes a
    checkpoint that tilerun runs with transformers' tokens."""
    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parents[1]
    args = ["--vocab", "128", "--hidden", "64", "--intermediate", "96", "--layers", "3"]
    # weights wide enough that the greedy choices are not near ties
    args += [
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--softmax-every",
        "3",
        "--initializer-range",
        "0.2",
    ]
    cmd = [sys.executable, str(root / "scripts/minimax_checkpoint.py"), str(tmp_path), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layers llf" in r.stdout
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    prompt = _prompt(40, seed=4, vocab=128)
    out = _engine(tmp_path).generate([prompt], SamplingParams(max_new_tokens=6))[0]
    assert out.token_ids == hf_greedy(hf, prompt, 6)


def test_minimax_small_preset_is_the_hybrid_the_demo_shows():
    """``./scripts/demo --model minimax-small``: seven lightning layers, then a softmax one
    (the only one with a KV cache), four experts; a batch gives each request's own tokens."""
    engine = _engine("minimax-small", max_num_seqs=2)
    worker = engine.executor.worker
    assert [layer.lightning for layer in worker.model.layers] == [True] * 7 + [False]
    assert len(worker.kv.layers) == 1
    prompts = [_prompt(n, seed=n, vocab=512) for n in (40, 130, 9)]
    params = SamplingParams(max_new_tokens=8)
    together = [o.token_ids for o in engine.generate(prompts, params)]
    assert together == [engine.generate([p], params)[0].token_ids for p in prompts]
    engine.shutdown()
