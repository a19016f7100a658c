"""Write a random-weight MiniMax-01-architecture checkpoint (lightning and softmax attention
layers, a mixture-of-experts MLP) with transformers, to try and benchmark tilerun's lightning
path without downloading one.

    python scripts/minimax_checkpoint.py /tmp/minimax                  # 8 layers, 1 softmax
    tilerun run --model /tmp/minimax --prompt-token-ids 1,2,3 --max-new-tokens 8 --json

The layer pattern is MiniMax-Text-01's: one softmax-attention layer after every
``--softmax-every - 1`` lightning layers. Weights are drawn with a fixed seed (``--seed``);
safetensors only.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--softmax-every", type=int, default=8, help="every n-th layer is softmax")
    ap.add_argument("--max-position-embeddings", type=int, default=262144)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--initializer-range", type=float, default=0.02, help="std of the random weights"
    )
    args = ap.parse_args()
    if args.softmax_every < 1 or args.layers < 1:
        ap.error("--layers and --softmax-every must be >= 1")
    import torch
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    types = [
        "full_attention" if (i + 1) % args.softmax_every == 0 else "linear_attention"
        for i in range(args.layers)
    ]
    if "full_attention" not in types:
        types[-1] = "full_attention"  # tilerun needs one softmax layer (its KV sizes the pool)
    cfg = MiniMaxConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        layer_types=types,
        max_position_embeddings=args.max_position_embeddings,
        eos_token_id=None,
        bos_token_id=None,
        initializer_range=args.initializer_range,
    )
    torch.manual_seed(args.seed)
    model = MiniMaxForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()
    args.directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.directory, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.directory}: {n / 1e6:.1f}M parameters, layers {''.join(t[0] for t in types)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
