"""Long-context benchmark: one task, batch 1, KV cache over the device and host tiers (issue #10).

For each context S: prefill S random tokens (chunked: no step holds more than ``--prefill-chunk``
tokens' activations, and only the sampled row's logits are computed), then decode
``--new-tokens`` tokens. Per row: prefill time, decode ms/token, peak device and host memory, KV
bytes moved, the attention mode the runtime chose, how much KV sat on each tier, and beside each
figure its bound from rates measured in the same run:

* decode: device-resident KV at the measured device bandwidth (a copy's read + write: the memory
  system's rate, which attention's reads reach) + host-resident KV at the measured host rates
  (host->device copy for ``stream``; copy and CPU attention together for ``cooperate``), and
  separately the same plus reading the weights once;
* prefill: the linear layers' FLOPs at the measured dense-matmul rate plus causal attention's
  FLOPs at the attention kernel's own measured rate (its prefill, causal, a few thousand tokens,
  in this run), and the bytes moved at the host->device rate (the larger is the bound: movement
  should hide behind compute). ``prefill_vs_attention`` is prefill time over the attention part
  alone (issue #10: within 1.3x at 256K).

Time to pin the host tier (``host_tier_ready_s``: only the blocks the longest context can use) is
reported on its own, outside the timings.

In the same run, transformers ``generate`` (random weights of the same shape, default
``DynamicCache`` and ``cache_implementation="offloaded"``) in a child process with a time limit,
where it runs (``--no-hf`` skips it).

    python scripts/bench_long_context.py --model tiny --contexts 256 512 --kv-cache-tokens 128
    python scripts/bench_long_context.py --model llama2-7b --device cuda \
        --contexts 32768 65536 131072 262144                                          # one H100

Writes ``benchmarks/results/long-context-<model>-<device>.json`` (command, device, date, rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from _command import command_line, write_result  # scripts/: the result's command line

from cluster.config import EngineConfig
from cluster.engine import Engine
from runtime import device as devmod
from runtime.spill_rates import best_time as _timed
from runtime.spill_rates import cpu_attention_rate, link_rate
from scheduler.request import SamplingParams

# -- measured rates ------------------------------------------------------------------------------


def measure_rates(worker, mib: int, cpu_keys: int) -> dict:
    """Bytes/s and FLOP/s this machine reaches, measured now (never assumed). The host->device
    link and the CPU part of cooperative attention are measured by ``runtime.spill_rates``, the
    functions the worker feeds its cost model with: the CPU over ``cpu_keys`` host tokens of the
    model's shape, laid out as the host pool holds them, with the worker's threads."""
    device, dtype = worker.device, worker.dtype
    c = worker.model_config
    head_dim = c.head_dim
    n = mib * 2**20
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = _timed(lambda: y.copy_(x), device)
    rates = {"device_bytes_per_s": 2 * n / t}  # read + write
    # host and device are the same memory on a CPU "device"
    rates["host_to_device_bytes_per_s"] = link_rate(device, n) if device.type == "cuda" else None
    kv = worker.kv
    run = (kv.host.chunk_blocks if kv is not None and kv.host else 128) * worker.limits.block_size
    cpu = cpu_attention_rate(
        c.num_attention_heads, c.num_key_value_heads, head_dim, dtype, keys=cpu_keys,
        run_tokens=run, threads=worker.cpu_threads,
        quant=kv.quant if kv is not None else None, block_size=worker.limits.block_size,
    )  # fmt: skip
    rates["cpu_attention_bytes_per_s"] = cpu.bytes_per_s
    rates["cpu_attention_method"] = cpu.method
    rates["cpu_attention_tried_bytes_per_s"] = cpu.tried
    rates["cpu_attention_threads"] = worker.cpu_threads or torch.get_num_threads()
    m = 4096 if device.type == "cuda" else 512
    a = torch.randn(m, m, dtype=dtype, device=device)
    t = _timed(lambda: a @ a, device)
    rates["matmul_flop_per_s"] = 2 * m**3 / t
    # a peer's causal prefill attention on the device (SDPA's fused kernel where there is one);
    # the bound uses tilerun's own kernel (measure_attention_rate)
    n, h = (4096, 32) if device.type == "cuda" else (512, 4)
    q = torch.randn(1, h, n, head_dim, dtype=dtype, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t = _timed(lambda: sdpa(q, q, q, is_causal=True), device)
    rates["sdpa_attention_flop_per_s"] = 2 * h * n * n * head_dim / t  # QK and PV, half of each
    return rates


def measure_attention_rate(worker, tokens: int) -> float:
    """FLOP/s of the worker's own attention kernel on one causal prefill of ``tokens`` tokens
    (all heads of the model's shape), FLOPs counted as ``4 * tokens^2 / 2 * Hq * D``."""
    from runtime.attention import AttentionMetadata

    c = worker.model_config
    dev, dtype, bs = worker.device, worker.dtype, worker.limits.block_size
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    nb = -(-tokens // bs)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(tokens, hq, d, generator=g, device=dev, dtype=dtype)
    k = torch.randn(nb, bs, hkv, d, generator=g, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    meta = AttentionMetadata.build([tokens], [tokens], [list(range(nb))], bs, dev)
    t = _timed(lambda: worker.backend.prefill(q, k, v, meta, d**-0.5), dev)
    return 4 * tokens * tokens / 2 * hq * d / t


def linear_params(c) -> int:
    """Weights the linear layers multiply by per token (attention projections, MLP), all layers;
    embeddings excluded (a lookup), the LM head too (only the sampled row's logits)."""
    qkv = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    o = c.num_attention_heads * c.head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (qkv + o + mlp)


# -- tilerun -------------------------------------------------------------------------------------


def engine_config(args, longest: int) -> EngineConfig:
    kw = dict(
        model=args.model, device=args.device, dtype=args.dtype, attention=args.attention,
        prefill_chunk=args.prefill_chunk, max_num_seqs=1, max_model_len=longest,
        block_size=args.block_size, kv_cache_tokens=args.kv_cache_tokens, executor="local",
    )  # fmt: skip
    kw.update(kv_host_tokens=args.kv_host_tokens, spill=args.spill)
    if args.kv_host_dtype is not None:
        kw["kv_host_dtype"] = args.kv_host_dtype
    return EngineConfig.from_dict(kw)


def run_tilerun(engine: Engine, prompt: list[int], new: int) -> dict:
    """One prefill + decode; the tier split is read from the block table at each step."""
    bs = engine.config.scheduler.block_size
    D = engine.executor.num_blocks
    split = {"device": 0, "host": 0}

    def watch(_p) -> None:
        for seq in engine.scheduler.running:
            host = sum(b >= D for b in seq.block_table)
            if host >= split["host"]:
                split.update(host=host, device=len(seq.block_table) - host)

    out = engine.generate([prompt], SamplingParams(max_new_tokens=new), on_progress=watch)[0]
    m = out.metrics
    kv = m.get("kv", {})
    return {
        "prefill_s": m["prefill_s"],
        "decode_ms_per_token": 1000 * m["decode_s"] / max(new - 1, 1),
        "peak_device_bytes": m["peak_memory_bytes"],
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "host_kv_allocated_bytes": max(
            m.get("kv_host_allocated_bytes", 0) for m in engine.executor.memory_stats()
        ),
        "kv_bytes_moved": kv.get("bytes_moved", 0),
        "kv_bytes_moved_per_step": kv.get("bytes_moved_per_step", 0.0),
        "exposed_move_s": kv.get("exposed_move_s", 0.0),
        "modes": kv.get("modes", {}),
        # prefill and decode steps by mode: seconds, exposed movement, the CPU's blocks
        "by_kind": kv.get("by_kind", {}),
        "blocks_spilled": kv.get("blocks_spilled", 0),
        "blocks_fetched": kv.get("blocks_fetched", 0),
        "kv_blocks_on_device_at_peak": split["device"],
        "kv_blocks_on_host_at_peak": split["host"],
        "block_tokens": bs,
        "first_tokens": out.token_ids[:8],
        # under --spill auto: mean seconds per step of each candidate the worker timed, by kind
        # of step (sequences, decode, host-block bucket), where the model picked cooperate
        "spill_tuner": engine.executor.worker.spill_tuner.summary(),
    }


def bounds(row: dict, rates: dict, kv_bytes_per_token: int, lin_params: int, weight_bytes: int,
           layers: int, q_width: int, host_bytes_per_token: float | None = None) -> dict:  # fmt: skip
    """The figures' bounds from the measured rates (seconds). ``host_bytes_per_token``: KV
    bytes a host-resident token is stored in (less than on the device for an 8-bit tier)."""
    bs = row["block_tokens"]
    dev_kv = row["kv_blocks_on_device_at_peak"] * bs * kv_bytes_per_token
    host_kv = row["kv_blocks_on_host_at_peak"] * bs * (host_bytes_per_token or kv_bytes_per_token)
    # the copy counted read + write: the memory system's rate, which attention's reads reach
    dev_bw = rates["device_bytes_per_s"]
    h2d = rates["host_to_device_bytes_per_s"]
    cpu = rates["cpu_attention_bytes_per_s"]
    if h2d is None:  # CPU "device": host-resident KV is read like the rest
        host_rate = dev_bw
    elif "cooperate" in row["modes"]:
        host_rate = h2d + cpu
    else:
        host_rate = h2d
    kv_s = dev_kv / dev_bw + host_kv / host_rate
    s = row["context"]
    attn_s = 2 * layers * q_width * s * s / rates["attention_flop_per_s"]  # causal QK and PV
    prefill_compute_s = 2 * lin_params * s / rates["matmul_flop_per_s"] + attn_s
    prefill_move_s = row["kv_bytes_moved"] / (h2d or dev_bw)
    return {
        "decode_kv_bound_ms": 1000 * kv_s,
        "decode_bound_ms": 1000 * (kv_s + weight_bytes / dev_bw),
        "decode_vs_bound": row["decode_ms_per_token"] / (1000 * (kv_s + weight_bytes / dev_bw)),
        "prefill_compute_bound_s": prefill_compute_s,
        "prefill_attention_s_at_kernel_rate": attn_s,
        "prefill_vs_attention": row["prefill_s"] / attn_s,
        "prefill_move_bound_s": prefill_move_s,
        "prefill_vs_bound": row["prefill_s"] / max(prefill_compute_s, prefill_move_s),
    }


# -- transformers, in a child process with a time limit ------------------------------------------


def hf_child(spec: dict) -> dict:
    """Runs in the child: random weights of the preset's shape, ``generate`` timed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime.presets import get_preset

    c = get_preset(spec["model"])
    dev = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=max(c.max_position_embeddings, spec["context"] + spec["new"]),
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with dev:
        hf = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c.vocab_size, (1, spec["context"]), generator=g).to(dev)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0,
              attention_mask=torch.ones_like(ids))  # fmt: skip
    if spec["cache"] != "default":
        kw["cache_implementation"] = spec["cache"]
    new = spec["new"]
    stamps: list[float] = []

    def stamp(_ids, scores):  # a logits processor: called once per generated token
        devmod.synchronize(dev)
        stamps.append(time.perf_counter())
        return scores

    with torch.inference_mode():
        devmod.reset_peak_memory(dev)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, logits_processor=[stamp], **kw)
        devmod.synchronize(dev)
    return {
        "prefill_s": stamps[0] - t0,
        "decode_ms_per_token": 1000 * (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1),
        "peak_device_bytes": devmod.peak_memory_bytes(dev),
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_hf(spec: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--hf-child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout_s:.0f} s (--hf-timeout-s)"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return {"error": tail[:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def raise_position_limit(model: str, longest: int) -> int | None:
    """Let a preset's random-weight model take ``longest`` positions in this process (a shape
    benchmark: trained context limits do not apply to random weights). Returns the new limit."""
    from runtime.presets import PRESETS

    cfg = PRESETS.get(model)
    if cfg is None or cfg.max_position_embeddings >= longest:
        return None
    PRESETS[model] = dataclasses.replace(cfg, max_position_embeddings=longest)
    return longest


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--hf-child":
        print(json.dumps(hf_child(json.loads(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b", help="preset: llama2-7b, llama3-8b, tiny, ...")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-tokens", type=int, default=None, help="device tier (auto)")
    ap.add_argument("--kv-host-tokens", type=int, default=None, help="host tier (auto)")
    ap.add_argument("--spill", default="auto", help="auto|stream|cooperate|off")
    ap.add_argument("--kv-host-dtype", default=None, help="auto|bfloat16|float16|float32|fp8|int8")
    ap.add_argument("--rate-mib", type=int, default=1024, help="buffer size for the rate probes")
    ap.add_argument(
        "--cpu-rate-tokens", type=int, default=65536, help="host tokens the CPU rate is read over"
    )
    ap.add_argument(
        "--attention-rate-tokens",
        type=int,
        default=None,
        help="causal prefill length the attention kernel's FLOP/s is measured at (4096 on CUDA)",
    )
    ap.add_argument(
        "--no-pin-first", action="store_true", help="let the host tier pin itself as it fills"
    )
    ap.add_argument("--no-hf", action="store_true", help="skip transformers generate")
    ap.add_argument("--hf-timeout-s", type=float, default=300.0, help="limit per transformers run")
    ap.add_argument(
        "--hf-max-context", type=int, default=65536, help="run transformers up to this context"
    )
    ap.add_argument(
        "--hf-new-tokens", type=int, default=8, help="tokens transformers decodes (its ms/token)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    longest = max(args.contexts) + args.new_tokens
    raised = raise_position_limit(args.model, longest)
    t0 = time.perf_counter()
    engine = Engine(engine_config(args, longest))
    worker = engine.executor.worker
    info = engine.device_infos[0]
    ready = engine.ready_line(time.perf_counter() - t0)
    print(ready, flush=True)
    c = engine.model_config
    dtype = worker.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem
    lin_params = linear_params(c)
    weight_bytes = sum(p.numel() * p.element_size() for p in worker.model.parameters())
    pin_s = None
    if not args.no_pin_first and worker.kv is not None and worker.kv.host_blocks:
        # the host tier pins itself in the background as it fills; for steady timings, the
        # blocks the longest context can use first (ids go out lowest first; about 2 GiB/s on
        # the GPU machine), timed on its own: not part of any row's figures
        need = min(worker.kv.host_blocks, -(-longest // args.block_size))
        t1 = time.perf_counter()
        worker.kv.wait_host_ready(None, blocks=need)
        pin_s = time.perf_counter() - t1
        gib = worker.kv.host.allocated_bytes / 2**30
        print(f"host tier: {need} blocks ({gib:.1f} GiB pinned) ready in {pin_s:.1f} s", flush=True)
    rates = measure_rates(worker, args.rate_mib, args.cpu_rate_tokens)
    attn_tokens = args.attention_rate_tokens or (4096 if worker.device.type == "cuda" else 256)
    rates["attention_flop_per_s"] = measure_attention_rate(worker, attn_tokens)
    rates["attention_rate_tokens"] = attn_tokens
    # what the engine's cost model is fed (runtime.spill_rates; measured here rather than at
    # the first step that reads host blocks, outside the timings), beside the above
    worker.ensure_spill_rates()
    if worker.spill_rates is not None:
        rates["cost_model"] = {**vars(worker.spill_rates), "cpu_method": worker.cpu_method}
    print(json.dumps({"rates": rates}), flush=True)

    g = torch.Generator().manual_seed(0)
    warm = torch.randint(0, c.vocab_size, (min(256, longest - 4),), generator=g).tolist()
    engine.generate([warm], SamplingParams(max_new_tokens=4))  # compile and warm kernels
    rows = []
    for s in args.contexts:
        prompt = torch.randint(0, c.vocab_size, (s,), generator=g).tolist()
        devmod.reset_peak_memory(worker.device)
        try:
            row = {
                "system": "tilerun",
                "context": s,
                **run_tilerun(engine, prompt, args.new_tokens),
            }
            host_per_token = (
                worker.kv.host_layer_block_bytes * c.num_hidden_layers / worker.limits.block_size
                if worker.kv is not None and worker.kv.host is not None
                else None
            )
            row.update(bounds(row, rates, kv_per_token, lin_params, weight_bytes,
                              c.num_hidden_layers, c.num_attention_heads * c.head_dim,
                              host_per_token))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a row that failed is a figure too
            row = {"system": "tilerun", "context": s, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    engine.shutdown()
    del engine, worker
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not args.no_hf:
        for s in [c for c in args.contexts if c <= args.hf_max_context]:
            for cache in ("default", "offloaded"):
                spec = {"model": args.model, "device": info["device"], "dtype": args.dtype,
                        "context": s, "new": args.hf_new_tokens, "cache": cache}  # fmt: skip
                r = run_hf(spec, args.hf_timeout_s)
                rows.append({"system": f"transformers[{cache}]", "context": s, **r})
                print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'system':<24}{'context':>9}{'prefill s':>11}{'decode ms':>11}{'bound ms':>10}"
          f"{'dev GiB':>9}{'host blk':>10}{'moved GiB':>11}{'vs attn':>9}  mode")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<24}{r['context']:>9}  {r['error'][:70]}")
            continue
        print(
            f"{r['system']:<24}{r['context']:>9}{r['prefill_s']:>11.2f}"
            f"{r['decode_ms_per_token']:>11.1f}{r.get('decode_bound_ms', float('nan')):>10.1f}"
            f"{r['peak_device_bytes'] / 2**30:>9.2f}{r.get('kv_blocks_on_host_at_peak', 0):>10}"
            f"{r.get('kv_bytes_moved', 0) / 2**30:>11.2f}"
            f"{r.get('prefill_vs_attention', float('nan')):>9.2f}  {r.get('modes', '')}"
        )
    result = {
        "benchmark": "long_context",
        "command": command_line(),
        "device": info["name"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": args.model,
        "new_tokens": args.new_tokens,
        "hf_new_tokens": args.hf_new_tokens,
        "max_position_embeddings_raised_to": raised,
        "ready_line": ready,
        "host_tier_ready_s": pin_s,  # pinning the host tier, not in any row's timings
        "rates": rates,
        "kv_bytes_per_token": kv_per_token,
        "rows": rows,
    }
    kind = "cpu" if info["device"] == "cpu" else info["name"].replace(" ", "-").lower()
    write_result(result, args.out, f"benchmarks/results/long-context-{args.model}-{kind}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
