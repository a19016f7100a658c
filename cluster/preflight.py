"""Checks that need no cluster and no weights, run before Ray starts or anything is allocated.

Everything a user can get wrong in a config or a prompt is refused here in one line, in seconds:
device and dtype, tensor-parallel divisibility, communicator vs device, the memory the config
needs vs what the machine has, token ids vs the vocabulary, prompt length vs the context.
``Engine`` calls :func:`check_engine`; the CLI also calls :func:`check_prompt` once the prompt
is tokenised, still before Ray starts.
"""

from __future__ import annotations

import importlib.util
import os

from cluster.config import EngineConfig
from runtime.config import ModelConfig
from runtime.memory_estimate import available_host_bytes, check_fits, estimate, run_weight_plan
from scheduler.errors import CapacityError, ConfigError
from scheduler.request import SamplingParams

DEVICE_TYPES = ("auto", "cpu", "cuda", "npu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_COMM_DEVICE = {"nccl": "cuda", "hccl": "npu"}


def device_type(device: str) -> str:
    """The device type the workers will use (``auto`` resolved on this host)."""
    kind = device.partition(":")[0]
    if kind not in DEVICE_TYPES:
        raise ConfigError(
            f"device={device!r} is not valid; choose one of {', '.join(DEVICE_TYPES)}"
        )
    if kind != "auto":
        return kind
    import torch

    from runtime.device import npu_available

    if torch.cuda.is_available():
        return "cuda"
    return "npu" if npu_available() else "cpu"


def check_engine(
    config: EngineConfig,
    model_config: ModelConfig,
    max_model_len: int,
    kv_tokens: int | None = None,
) -> None:
    """Refuse what cannot work before a cluster starts. With ``ray_address`` set (or
    ``RAY_ADDRESS``) the workers may run on other hosts, so local device presence and memory are
    not held against them. ``kv_tokens``: the KV cache the run needs (default: the configured
    ``kv_cache_tokens``, else one block; the workers size the rest from what is left)."""
    w, c, sch = config.worker, config.cluster, config.scheduler
    local = c.executor == "local" or not (c.ray_address or os.environ.get("RAY_ADDRESS"))
    kind = device_type(w.device)
    if w.dtype not in DTYPES:
        raise ConfigError(f"dtype={w.dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
    if local and kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "device='cuda' was asked for but torch sees no CUDA GPU on this host "
                f"(torch {torch.__version__}); use --device cpu, or run on a GPU host"
            )
        if c.tp > torch.cuda.device_count():
            raise ConfigError(
                f"tp={c.tp} needs {c.tp} GPUs but this host has {torch.cuda.device_count()}; "
                "lower --tp or attach to a larger cluster (--ray-address)"
            )
    if local and kind == "npu":
        from runtime.device import npu_available

        if not npu_available():
            raise ConfigError("device='npu' was asked for but torch_npu is missing or sees no NPU")
    if w.expert_parallel and not model_config.num_local_experts:
        raise ConfigError(
            f"expert_parallel: the model ({model_config.model_type}) has no mixture of experts "
            "to split; drop --expert-parallel"
        )
    _check_tp(c.tp, model_config, w.expert_parallel)
    _check_comm(c.tp, c.comm, kind)
    dtype = w.dtype
    if dtype == "auto":
        dtype = "float32" if kind == "cpu" else "bfloat16"
    if kv_tokens is None:
        kv_tokens = w.kv_cache_tokens or sch.block_size
    plan, _ = run_weight_plan(model_config, dtype, c.tp, w.offload_weights_gib, w.weight_tier, kind)
    est = estimate(
        model_config,
        dtype,
        tp=c.tp,
        kv_tokens=kv_tokens,
        prefill_chunk=min(sch.for_device(kind).prefill_chunk, max_model_len),
        block_size=sch.block_size,
        offloaded=plan.freed_bytes,
    )
    if local and kind == "cpu":
        check_fits(est, available_host_bytes(), "this host's memory", ranks_sharing=c.tp)
    elif local and kind == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        check_fits(est, int(total * w.gpu_memory_utilization), "each GPU")


def _check_tp(tp: int, c: ModelConfig, expert_parallel: bool = False) -> None:
    # experts split whole over the ranks (expert parallelism), or each expert sliced
    split = "num_local_experts" if expert_parallel else "intermediate_size"
    for name in ("num_attention_heads", "num_key_value_heads", split):
        value = getattr(c, name)
        if value % tp:
            divisors = [d for d in range(1, min(value, 64) + 1) if value % d == 0]
            raise ConfigError(
                f"tp={tp} does not divide the model's {name}={value}; choose a --tp that "
                f"divides it ({', '.join(map(str, divisors[:8]))}...)"
            )


def _check_comm(tp: int, comm: str, kind: str) -> None:
    if tp == 1 or comm == "auto":
        return
    need = _COMM_DEVICE.get(comm)
    if need and kind != need:
        raise ConfigError(
            f"comm={comm!r} runs on {need} devices, but the workers use {kind}; use "
            f"--comm gloo{' or --comm mpi' if kind in ('cpu', 'cuda') else ''} on {kind}, "
            "or --comm auto"
        )
    if comm == "mpi" and importlib.util.find_spec("mpi4py") is None:
        raise ConfigError(
            "comm='mpi' needs mpi4py and an MPI library: pip install mpi4py mpich "
            "(or pip install 'tilerun[mpi]'), or use --comm gloo"
        )


def check_prompt(
    ids: list[int], params: SamplingParams, model_config: ModelConfig, max_model_len: int
) -> None:
    """Refuse an empty prompt, token ids outside the vocabulary and a request longer than the
    context, before the engine starts."""
    if not ids:
        raise CapacityError("the prompt is empty: give at least one token of text")
    vocab = model_config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise CapacityError(
            f"prompt token id(s) {bad[:5]} are outside the model's vocabulary [0, {vocab})"
        )
    total = len(ids) + params.max_new_tokens
    if total > max_model_len:
        raise CapacityError(
            f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} = {total} "
            f"exceeds the model's context limit max_model_len={max_model_len} by "
            f"{total - max_model_len} tokens; "
            "shorten the prompt, lower --max-new-tokens or raise --max-model-len"
        )


__all__ = ["check_engine", "check_prompt", "device_type"]
