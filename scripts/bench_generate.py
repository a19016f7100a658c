"""End-to-end generation benchmark: tilerun against transformers ``generate`` on the same weights.

For each context length S: prefill S prompt tokens (time to first token), then decode N tokens;
prefill tokens/s, decode ms/token and peak device memory for

* tilerun (one worker in this process, each ``--attention`` backend asked for), and
* transformers ``generate`` (sdpa attention, its default cache) on the same weights: for a
  preset, a ``LlamaForCausalLM`` holding exactly tilerun's tensors (unfused, shared); for a
  checkpoint directory, the checkpoint as transformers itself loads it (a MiniMax checkpoint
  from ``scripts/minimax_checkpoint.py``, say).

    python scripts/bench_generate.py --model demo-small --contexts 1024 2048 4096      # CPU
    python scripts/bench_generate.py --model /tmp/minimax --contexts 1024 4096 8192   # a checkpoint
    python scripts/bench_generate.py --model llama2-7b --contexts 4096 16384 32768 \
        --attention triton torch --device cuda                                          # H100

Writes ``benchmarks/results/generate-<device>.json`` (command, device, date, versions, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _command import command_line, write_result  # scripts/: the result's command line

from cluster.config import EngineConfig
from cluster.engine import Engine
from runtime import device as devmod
from runtime.layers.rotary import inverse_frequencies
from scheduler.request import SamplingParams


def hf_from_tilerun(engine: Engine):
    """A transformers Llama holding tilerun's weights (q|k|v and gate|up unfused)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = engine.model_config
    model = engine.executor.worker.model
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    dev = next(model.parameters()).device
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    sd = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.self_attn.qkv_proj.weight.split([q, kv, kv])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        sd |= {
            p + "self_attn.q_proj.weight": wq,
            p + "self_attn.k_proj.weight": wk,
            p + "self_attn.v_proj.weight": wv,
            p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        }
    # assign=True shares tilerun's storage: no second copy of the weights
    hf.load_state_dict(sd, assign=True, strict=False)
    hf.model.rotary_emb.to_empty(device=dev)
    inv = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).to(dev)
    hf.model.rotary_emb.inv_freq = hf.model.rotary_emb.original_inv_freq = inv
    return hf.eval()


def hf_for(engine: Engine, model: str):
    """The transformers peer on the same weights: a checkpoint directory loaded by transformers
    itself (any architecture it knows, MiniMax included), else a preset's weights shared."""
    if not Path(model).is_dir():
        return hf_from_tilerun(engine)
    from transformers import AutoModelForCausalLM

    d = engine.executor.worker.device
    dtype = next(engine.executor.worker.model.parameters()).dtype
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
    return hf.to(d).eval()


def time_tilerun(engine: Engine, prompt: list[int], new: int) -> dict:
    d = engine.executor.worker.device
    first = engine.generate([prompt], SamplingParams(max_new_tokens=1))[0]
    devmod.synchronize(d)
    ttft = first.metrics["ttft_s"]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=new))[0]
    m = out.metrics
    return {
        "prefill_s": ttft,
        "prefill_tokens_per_s": len(prompt) / ttft,
        "decode_ms_per_token": 1000 * m["decode_s"] / max(new - 1, 1),
        "peak_gib": m["peak_memory_bytes"] / 2**30,
        "first_tokens": out.token_ids[:8],
    }


def _best(a: dict | None, b: dict) -> dict:
    """Per figure the better of two repeats (shortest prefill, fastest decode, highest peak)."""
    if a is None:
        return b
    out = dict(a)
    if b["prefill_s"] < a["prefill_s"]:
        out["prefill_s"], out["prefill_tokens_per_s"] = b["prefill_s"], b["prefill_tokens_per_s"]
    out["decode_ms_per_token"] = min(a["decode_ms_per_token"], b["decode_ms_per_token"])
    out["peak_gib"] = max(a["peak_gib"], b["peak_gib"])
    return out


def _step_clock():
    """A transformers stopping criterion that never stops and stamps each generated token: decode
    time per token from its own steps, not from the difference of two runs (which a busy
    machine can make negative)."""
    from transformers import StoppingCriteria

    class Clock(StoppingCriteria):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Clock()


@torch.inference_mode()
def time_hf(hf, prompt: list[int], new: int, d: torch.device) -> dict:
    from transformers import StoppingCriteriaList

    ids = torch.tensor([prompt], device=d)
    kw = dict(
        do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids)
    )
    devmod.reset_peak_memory(d)
    devmod.synchronize(d)
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    devmod.synchronize(d)
    t1 = time.perf_counter()
    clock = _step_clock()
    out = hf.generate(
        ids,
        max_new_tokens=new,
        min_new_tokens=new,
        stopping_criteria=StoppingCriteriaList([clock]),
        **kw,
    )
    devmod.synchronize(d)
    st = clock.stamps
    return {
        "prefill_s": t1 - t0,
        "prefill_tokens_per_s": len(prompt) / (t1 - t0),
        # tokens 2..new, each stamped as it is produced (the first one ends the prefill)
        "decode_ms_per_token": 1000 * (st[-1] - st[0]) / max(len(st) - 1, 1),
        "peak_gib": devmod.peak_memory_bytes(d) / 2**30,
        "first_tokens": out[0, len(prompt) : len(prompt) + 8].tolist(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-small")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--attention", nargs="+", default=["auto"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="tokens per prefill step (default: the engine's for the device, as users get it)",
    )
    ap.add_argument("--q-tile", type=int, default=128, help="portable backend's query tile")
    ap.add_argument("--kv-tile", type=int, default=512, help="portable backend's key/value tile")
    ap.add_argument(
        "--torch-max-context",
        type=int,
        default=None,
        help="run the portable torch backend only up to this context (it is slow on GPUs)",
    )
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument(
        "--repeats", type=int, default=1, help="alternate tilerun and transformers this often"
    )
    ap.add_argument(
        "--no-cuda-graphs", action="store_true", help="decode eagerly, without CUDA graphs"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    longest = max(args.contexts) + args.new_tokens
    # a shared machine: the load average beside the figures says how busy it was
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    hf_done: set[int] = set()
    for attn in args.attention:
        cfg = EngineConfig.from_dict(dict(
            model=args.model, device=args.device, dtype=args.dtype, attention=attn,
            prefill_chunk=args.prefill_chunk, max_num_seqs=1, max_model_len=longest,
            kv_cache_tokens=longest + 16, q_tile=args.q_tile, kv_tile=args.kv_tile,
            cuda_graphs=not args.no_cuda_graphs, executor="local", kv_host_tokens=0,
        ))  # fmt: skip
        engine = Engine(cfg)
        chunk = engine.config.scheduler.prefill_chunk  # the device's default where not given
        info = engine.device_infos[0]
        print(f"attention={info['attention']} ({info.get('attention_reason')})", flush=True)
        d = engine.executor.worker.device
        g = torch.Generator().manual_seed(0)
        warm = torch.randint(0, engine.model_config.vocab_size, (256,), generator=g).tolist()
        engine.generate([warm], SamplingParams(max_new_tokens=4))  # compile/warm kernels
        for s in args.contexts:
            if (
                info["attention"] == "torch"
                and args.torch_max_context
                and s > args.torch_max_context
            ):
                continue
            prompt = torch.randint(0, engine.model_config.vocab_size, (s,), generator=g).tolist()
            run_hf = not args.no_hf and s not in hf_done
            hf = None
            if run_hf:
                hf = hf_for(engine, args.model)
                time_hf(hf, warm, 4, d)  # warm-up, as tilerun had
                # tilerun's KV cache stays allocated; free what we can for a fair peak
                gc.collect()
            r = h = None
            # tilerun and transformers alternate, ``--repeats`` times: a busy moment on a shared
            # machine hits both; each keeps its best prefill and its best decode
            for _ in range(args.repeats):
                r = _best(r, time_tilerun(engine, prompt, args.new_tokens))
                if hf is not None and (h is None or "error" not in h):
                    try:
                        h = _best(h, time_hf(hf, prompt, args.new_tokens, d))
                    except torch.OutOfMemoryError as e:
                        h = {"error": f"OOM: {e}"[:200]}
            r["load_avg_1m"] = os.getloadavg()[0] if load_start else None
            rows.append({"system": f"tilerun[{info['attention']}]", "context": s, **r})
            print(json.dumps(rows[-1]), flush=True)
            if run_hf:
                if "error" not in h:
                    h["same_first_tokens_as_tilerun"] = h["first_tokens"] == r["first_tokens"]
                    h["load_avg_1m"] = os.getloadavg()[0] if load_start else None
                rows.append({"system": "transformers[sdpa]", "context": s, **h})
                print(json.dumps(rows[-1]), flush=True)
                hf_done.add(s)
                del hf
                gc.collect()
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    print(
        f"\n{'system':<22}{'context':>9}{'prefill tok/s':>15}{'TTFT s':>9}{'decode ms/tok':>15}{'peak GiB':>10}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<22}{r['context']:>9}  {r['error'][:60]}")
            continue
        print(
            f"{r['system']:<22}{r['context']:>9}{r['prefill_tokens_per_s']:>15,.0f}"
            f"{r['prefill_s']:>9.2f}{r['decode_ms_per_token']:>15.1f}{r['peak_gib']:>10.2f}"
        )
    import transformers

    result = {
        "benchmark": "generate",
        "command": command_line(),
        "device": info["name"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": args.model,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prefill_chunk": chunk,
        "attention_reason": info.get("attention_reason"),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg() if load_start else None,
        "note": "peak memory for transformers includes tilerun's resident weights "
        + ("(its own copy)" if Path(args.model).is_dir() else "(shared)")
        + " and KV cache",
        "rows": rows,
    }
    kind = "cpu" if info["device"] == "cpu" else info["name"].replace(" ", "-").lower()
    write_result(result, args.out, f"benchmarks/results/generate-{kind}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
