"""Weights in a slower tier: tilerun's streamed layers against transformers + accelerate's
offload of the same layers, and each against its own all-resident run, on the same checkpoint.

On the CPU device the slower tier is disk (tilerun's ``--weight-tier disk``: a mapped file read
in place, read ahead a layer early; accelerate's ``device_map`` value ``"disk"``: a memory-mapped
file per tensor, loaded by a hook before each layer); on a GPU it is host memory (``host``: two
device slots filled on a side stream / accelerate's ``"cpu"``). Both systems stream exactly the
layers tilerun's plan picks for ``--offload-gib``. Beside the figures: the tier's measured read
rate (the streamed bytes read with ``preadv`` from a file, or copied host to device, in this
run) and the bound it gives, ``max(resident step, bytes / rate)`` if the reads hide completely
and ``resident step + bytes / rate`` if nothing hides. On the CPU the file usually sits in the
page cache (this machine has room for it), so the figures are the warm case: what a model that
fits in memory pays for living in a file; a model larger than memory pays the disk's rate.

    python scripts/bench_weight_tier.py                       # CPU, disk tier, a 0.8 GB model
    python scripts/bench_weight_tier.py --cold                # the same, read from the disk
    python scripts/bench_weight_tier.py --device cuda --layers 32 --hidden 4096 \
        --intermediate 11008 --offload-gib 6 --dtype bfloat16  # GPU, host tier (7B shape)

Writes ``benchmarks/results/weight-tier-<device>.json``. Needs ``accelerate`` for the peer
(``pip install accelerate``; without it the peer rows say so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _command import command_line  # scripts/: the result's command line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import _best, time_hf, time_tilerun  # noqa: E402

from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import Engine  # noqa: E402
from runtime.memory_estimate import run_weight_plan  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402


def write_checkpoint(d: Path, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=8192,
        initializer_range=0.05,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(getattr(torch, args.dtype)).save_pretrained(d)


def read_rate(
    nbytes: int, device: torch.device, directory: str, cold: bool = False, piece: int = 0
) -> float:
    """Bytes/s of moving ``nbytes`` the way the tier does: ``preadv`` from a file (CPU device;
    ``cold``: dropped from the page cache before each read, so from the disk), else page-locked
    host to device copies of ``piece`` bytes each (a streamed layer; 0: one copy). Best of
    three."""
    best = 0.0
    if device.type == "cpu":
        fd, path = tempfile.mkstemp(dir=directory)
        os.unlink(path)
        block = os.urandom(1 << 20)
        for off in range(0, nbytes, 1 << 20):
            os.pwrite(fd, block, off)
        os.fdatasync(fd)
        buf = bytearray(nbytes)
        view = memoryview(buf)
        for _ in range(3):
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0, pos = time.perf_counter(), 0
            while pos < nbytes:
                pos += os.preadv(fd, [view[pos:]], pos)
            best = max(best, nbytes / (time.perf_counter() - t0))
        os.close(fd)
        return best
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    piece = piece or nbytes
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for off in range(0, nbytes, piece):  # one layer a copy, as the ring moves them
            dst[off : off + piece].copy_(src[off : off + piece], non_blocking=True)
        torch.cuda.synchronize(device)
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def hf_model(ckpt: Path, dtype, device: torch.device, streamed, n_layers, folder: str):
    from transformers import AutoModelForCausalLM

    if not streamed:
        m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
        return m.to(device).eval()
    slow = "disk" if device.type == "cpu" else "cpu"
    here = "cpu" if device.type == "cpu" else device.index or 0
    device_map = {"model.embed_tokens": here, "model.norm": here, "model.rotary_emb": here}
    device_map["lm_head"] = here
    for i in range(n_layers):
        device_map[f"model.layers.{i}"] = slow if i in streamed else here
    m = AutoModelForCausalLM.from_pretrained(
        ckpt,
        dtype=dtype,
        attn_implementation="sdpa",
        device_map=device_map,
        offload_folder=folder,
    )
    return m.eval()


def drop_after_use(layers, streamed, drop) -> None:
    """``--cold``: each streamed layer's bytes leave memory as soon as it has run, as a model
    larger than memory loses the layer it used longest ago, so every step reads them from the
    disk. ``drop(j)`` drops the ``j``-th streamed layer's."""
    for j, i in enumerate(streamed):
        layers[i].register_forward_hook(lambda *args, j=j: drop(j))


def drop_files(folder: str) -> None:
    """accelerate's disk tier: ``.dat`` files in the offload folder, or the checkpoint's own
    safetensors file, which it reads offloaded layers from where the dtype matches."""
    for f in [*Path(folder).rglob("*.dat"), *Path(folder).rglob("*.safetensors")]:
        fd = os.open(f, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: write one (Llama)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload-gib", type=float, default=0.3)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tier-dir", default=None, help="where both systems' disk tiers write")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="CPU: drop each streamed layer's bytes from memory once it has run (both systems), "
        "so each step reads them from the disk: a model larger than memory",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.cold and device.type != "cpu":
        ap.error("--cold measures the CPU device's disk tier; a GPU's tier is host memory")
    work = tempfile.TemporaryDirectory(prefix="bench-weight-tier-", dir=args.tier_dir)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = Path(work.name) / "ckpt"
        write_checkpoint(ckpt, args)
    longest = args.context + args.new_tokens
    base = dict(
        model=str(ckpt), device=args.device, dtype=args.dtype, max_num_seqs=1,
        max_model_len=longest, kv_cache_tokens=longest + 16, executor="local",
        kv_host_tokens=0, prefill_chunk=args.context, weight_tier_dir=work.name,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows = []
    peers: dict[str, dict] = {}
    plan = None
    for offload in (0.0, args.offload_gib):
        engine = Engine(EngineConfig.from_dict({**base, "offload_weights_gib": offload}))
        worker = engine.executor.worker
        cfg = engine.model_config
        plan, _ = run_weight_plan(cfg, args.dtype, 1, offload, "auto", device.type)
        g.manual_seed(0)  # the same prompt for both runs
        prompt = torch.randint(0, cfg.vocab_size, (args.context,), generator=g).tolist()
        warm = prompt[:64]
        engine.generate([warm], SamplingParams(max_new_tokens=4))
        cold = args.cold and bool(plan.streamed)
        if cold:
            drop_after_use(worker.model.layers, plan.streamed, worker.weight_streamer.drop_pages)
        hf = None
        try:
            hf = hf_model(ckpt, dtype, device, set(plan.streamed), cfg.num_hidden_layers, work.name)
            time_hf(hf, warm, 4, device)
            if cold:  # accelerate reads no layer ahead: dropping all its files drops this one
                drop_after_use(hf.model.layers, plan.streamed, lambda j: drop_files(work.name))
        except ImportError as e:
            peers[str(offload)] = {"error": f"transformers/accelerate missing: {e}"}
        r = h = None
        for _ in range(args.repeats):  # alternate, keep each figure's best
            r = _best(r, time_tilerun(engine, prompt, args.new_tokens))
            if hf is not None:
                h = _best(h, time_hf(hf, prompt, args.new_tokens, device))
        stats = worker.memory_stats()["weight_tier"]
        what = {
            "offload_gib": offload,
            "streamed_layers": list(plan.streamed),
            "streamed_bytes_per_step": plan.streamed_bytes,
            "device_weight_bytes_freed": plan.freed_bytes,
        }
        rows.append({"system": "tilerun", **what, **r, "tier": stats})
        print(json.dumps(rows[-1]), flush=True)
        if h is not None:
            h["same_first_tokens_as_tilerun"] = h["first_tokens"] == r["first_tokens"]
            rows.append({"system": "transformers+accelerate", **what, **h})
            print(json.dumps(rows[-1]), flush=True)
        engine.shutdown()
        del engine, hf
        gc.collect()
    piece = max((plan.layer_bytes[i] for i in plan.streamed), default=0)
    rate = read_rate(plan.streamed_bytes, device, work.name, cold=args.cold, piece=piece)
    resident = {r["system"]: r for r in rows if r["offload_gib"] == 0}
    for r in rows:
        if r["offload_gib"]:
            base_ms = resident[r["system"]]["decode_ms_per_token"]
            read_ms = 1000 * r["streamed_bytes_per_step"] / rate
            r["bound"] = {
                "tier_read_gb_per_s": round(rate / 1e9, 2),
                "read_ms_per_step": round(read_ms, 2),
                "all_hidden_ms": round(max(base_ms, read_ms), 2),
                "none_hidden_ms": round(base_ms + read_ms, 2),
                "exposed_share_of_read": round((r["decode_ms_per_token"] - base_ms) / read_ms, 3),
            }
    print(f"\n{'system':<26}{'offload GiB':>12}{'prefill tok/s':>15}{'decode ms/tok':>15}")
    for r in rows:
        print(
            f"{r['system']:<26}{r['offload_gib']:>12.2f}{r['prefill_tokens_per_s']:>15,.0f}"
            f"{r['decode_ms_per_token']:>15.1f}  {json.dumps(r.get('bound', ''))}"
        )
    import transformers

    try:
        import accelerate

        acc = accelerate.__version__
    except ImportError:
        acc = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result = {
        "benchmark": "weight-tier",
        "command": command_line(),
        "device": name or platform.machine(),
        "cpu_count": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": acc,
        },
        "setup": {**vars(args), "checkpoint": str(args.checkpoint), "tier_dir": args.tier_dir},
        "load_avg_1m": os.getloadavg()[0],
        "rows": rows,
        "peer_errors": peers,
    }
    tag = "cpu" if device.type == "cpu" else name.lower().replace(" ", "-")
    tag += "-cold" if args.cold else ""
    out = Path(args.out or f"benchmarks/results/weight-tier-{tag}.json")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
