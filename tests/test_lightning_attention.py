"""Lightning attention: the tiled prefill and the O(1) decode against the float64 definition, and
in place of the attention core of transformers' MiniMax lightning layer on the same weights."""

from __future__ import annotations

import pytest
import torch

from runtime.attention.lightning import (
    lightning_decode,
    lightning_forward,
    lightning_prefill,
    new_states,
)
from runtime.attention.lightning_reference import reference_lightning

H, D, E = 4, 16, 8
# a fast-forgetting head (lambda^256 ~ 1e-56), two in between and one that barely decays
SLOPES = torch.tensor([0.5, 0.05, 0.005, 0.0005])


def _inputs(T: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(T, H, D, generator=g) for _ in range(2))
    v = torch.randn(T, H, E, generator=g)
    state = torch.randn(H, D, E, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("T", [1, 2, 63, 256, 257, 1000, 4096 + 17])
@pytest.mark.parametrize("block_size", [256, 64, 7])
def test_prefill_matches_float64_definition(T, block_size):
    q, k, v, state = _inputs(T)
    ref_out, ref_state = reference_lightning(q, k, v, SLOPES, state)
    got_state = state.clone()
    out = lightning_prefill(q, k, v, SLOPES, got_state, block_size)
    assert out.shape == (T, H, E) and out.dtype == q.dtype
    assert _rel(out, ref_out) < 1e-5
    assert _rel(got_state, ref_state) < 1e-5


def test_prefill_from_zero_state_equals_fresh_start():
    q, k, v, _ = _inputs(300)
    ref_out, ref_state = reference_lightning(q, k, v, SLOPES)
    state = new_states(1, H, D, E)[0]
    assert _rel(lightning_prefill(q, k, v, SLOPES, state), ref_out) < 1e-5
    assert _rel(state, ref_state) < 1e-5


@pytest.mark.parametrize("cuts", [[100, 412], [256, 256, 1], [1, 1, 510], [37, 300, 175]])
def test_chunked_prefill_and_decode_equal_one_prefill(cuts):
    """Chunks of a prompt (and single tokens, decoded) continue from the state the previous
    step left: the result is that of one prefill of the whole text."""
    T = sum(cuts)
    q, k, v, state = _inputs(T, seed=1)
    whole_state = state.clone()
    whole = lightning_prefill(q, k, v, SLOPES, whole_state)
    state = state.clone()
    parts, a = [], 0
    for n in cuts:
        if n == 1:
            st = state.unsqueeze(0)  # a batch of one, advanced in place
            parts.append(lightning_decode(q[a : a + 1], k[a : a + 1], v[a : a + 1], SLOPES, st))
        else:
            parts.append(lightning_prefill(q[a : a + n], k[a : a + n], v[a : a + n], SLOPES, state))
        a += n
    assert _rel(torch.cat(parts), whole) < 1e-5
    assert _rel(state, whole_state) < 1e-5


def test_packed_step_of_several_sequences():
    """A step mixing a long prefill, a short one and a one-token continuation: each sequence is
    its own recurrence over its own state."""
    lens = [600, 5, 1]
    qs = [_inputs(n, seed=10 + i) for i, n in enumerate(lens)]
    q, k, v = (torch.cat([x[j] for x in qs]) for j in range(3))
    states = torch.stack([x[3] for x in qs])
    start_states = states.clone()
    out = lightning_forward(q, k, v, SLOPES, lens, states)
    a = 0
    for b, n in enumerate(lens):
        ref_out, ref_state = reference_lightning(
            q[a : a + n], k[a : a + n], v[a : a + n], SLOPES, start_states[b]
        )
        assert _rel(out[a : a + n], ref_out) < 1e-5
        assert _rel(states[b], ref_state) < 1e-5
        a += n


def test_decode_batch_matches_definition():
    N = 5
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(N, H, D, generator=g) for _ in range(2))
    v = torch.randn(N, H, E, generator=g)
    states = torch.randn(N, H, D, E, generator=g)
    refs = [reference_lightning(q[b : b + 1], k[b : b + 1], v[b : b + 1], SLOPES, states[b])
            for b in range(N)]  # fmt: skip
    out = lightning_forward(q, k, v, SLOPES, [1] * N, states)
    for b, (ro, rs) in enumerate(refs):
        assert _rel(out[b : b + 1], ro) < 1e-6
        assert _rel(states[b], rs) < 1e-6


def test_decode_of_non_contiguous_states():
    """States that are a strided view (a slice of a larger store) advance in place too."""
    N = 3
    g = torch.Generator().manual_seed(8)
    q, k = (torch.randn(N, H, D, generator=g) for _ in range(2))
    v = torch.randn(N, H, E, generator=g)
    store = torch.randn(N, H, E, D, generator=g)
    states = store.transpose(-1, -2)  # [N, H, D, E], not contiguous
    start = states.clone()
    out = lightning_decode(q, k, v, SLOPES, states)
    for b in range(N):
        ro, rs = reference_lightning(q[b : b + 1], k[b : b + 1], v[b : b + 1], SLOPES, start[b])
        assert _rel(out[b : b + 1], ro) < 1e-6
        assert _rel(store[b].transpose(-1, -2), rs) < 1e-6


def test_prefill_into_a_strided_state():
    """A state that is a strided view (a slice of a larger store) advances in place."""
    q, k, v, _ = _inputs(300, seed=12)
    store = torch.randn(H, E, D)
    state = store.transpose(-1, -2)  # [H, D, E], not contiguous
    ref_out, ref_state = reference_lightning(q, k, v, SLOPES, state.clone())
    out = lightning_prefill(q, k, v, SLOPES, state)
    assert _rel(out, ref_out) < 1e-5
    assert _rel(store.transpose(-1, -2), ref_state) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v, state = _inputs(700, seed=4, dtype=torch.bfloat16)
    ref_out, ref_state = reference_lightning(q, k, v, SLOPES, state)
    out = lightning_prefill(q, k, v, SLOPES, state)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-2  # the output's own rounding: 2^-8
    assert _rel(state, ref_state) < 1e-5  # products of bf16 values, summed in float32


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v, s: lightning_prefill(q, k[:, :2], v, s, torch.zeros(H, D, E)), "same T"),
        (lambda q, k, v, s: lightning_prefill(q, k, v, s[:2], torch.zeros(H, D, E)), "per head"),
        (lambda q, k, v, s: lightning_prefill(q, k, v, s, torch.zeros(H, D, E), 0), "block_size"),
        (
            lambda q, k, v, s: lightning_forward(q, k, v, s, [3, 3], new_states(1, H, D, E)),
            "2 sequences but 1 states",
        ),  # fmt: skip
        (
            lambda q, k, v, s: lightning_forward(q, k, v, s, [3, 3], new_states(2, H, D, E)),
            "add up to 6",
        ),  # fmt: skip
        (
            lambda q, k, v, s: lightning_forward(q, k, v, s, [10], new_states(1, H, D, D)),
            r"states must be \[N, H, D, E\]",
        ),
        (
            lambda q, k, v, s: lightning_prefill(q, k, v, s, torch.zeros(H, D, E).bfloat16()),
            "states are float32",
        ),
    ],
)
def test_bad_input_is_one_clear_line(call, match):
    q, k, v, _ = _inputs(10)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, SLOPES)


# -- against transformers' MiniMax lightning layer -------------------------------------------------


def _minimax_layer(layer_idx: int = 1, block_size: int = 256):
    transformers = pytest.importorskip("transformers")
    mm = pytest.importorskip("transformers.models.minimax.modeling_minimax")
    cfg = transformers.MiniMaxConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        num_key_value_heads=4,
        num_hidden_layers=4,
        block_size=block_size,
        layer_types=["linear_attention"] * 4,
    )
    torch.manual_seed(0)
    layer = mm.MiniMaxLightningAttention(cfg, layer_idx).eval()
    return layer, mm


def _ours(layer, x: torch.Tensor, states: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """The HF layer's projections, norm and gate around this module's attention core:
    ``x [T, hidden]`` packed, ``states`` advanced in place."""
    T = x.shape[0]
    h, d = layer.num_attention_heads, layer.head_dim
    qkv = layer.act_fn(layer.qkv_proj(x)).view(T, h, 3 * d)
    q, k, v = qkv.split(d, dim=-1)
    o = lightning_forward(q, k, v, layer.slope_rate.view(h), lens, states)
    o = layer.norm(o.reshape(T, h * d))
    return layer.out_proj(torch.sigmoid(layer.output_gate(x)) * o)


@pytest.mark.parametrize("T", [5, 256, 700])
@pytest.mark.parametrize("layer_idx", [0, 2])
def test_prefill_then_decode_matches_transformers_minimax(T, layer_idx):
    """Prefill of ``T`` tokens (HF: its block loop), then 4 tokens decoded one at a time (HF:
    its recurrence over the cached state): the same outputs and the same state."""
    layer, mm = _minimax_layer(layer_idx)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(1, T + 4, 64, generator=g)
    cache = mm.MiniMaxCache()
    with torch.no_grad():
        hf_pre, hf_state = layer(x[:, :T], None, None, cache=cache)
        hf_dec = [layer(x[:, T + i : T + i + 1], None, None, cache=cache)[0] for i in range(4)]
        states = new_states(1, layer.num_attention_heads, layer.head_dim, layer.head_dim)
        ours_pre = _ours(layer, x[0, :T], states, [T])
        assert _rel(states[0], hf_state[0]) < 1e-4
        ours_dec = [_ours(layer, x[0, T + i : T + i + 1], states, [1]) for i in range(4)]
    assert _rel(ours_pre, hf_pre[0]) < 1e-4
    for o, hf in zip(ours_dec, hf_dec):
        assert _rel(o, hf[0]) < 1e-4
    assert _rel(states[0], cache.get_linear_cache(layer_idx)[0]) < 1e-4


def test_continued_prefill_matches_transformers_recurrence():
    """A second prompt chunk on top of a cached state: transformers runs its token recurrence
    there; the tiled prefill from the state gives the same outputs."""
    layer, mm = _minimax_layer(1)
    x = torch.randn(1, 300 + 90, 64, generator=torch.Generator().manual_seed(7))
    cache = mm.MiniMaxCache()
    with torch.no_grad():
        layer(x[:, :300], None, None, cache=cache)
        hf_more, _ = layer(x[:, 300:], None, None, cache=cache)
        states = new_states(1, layer.num_attention_heads, layer.head_dim, layer.head_dim)
        _ours(layer, x[0, :300], states, [300])
        ours_more = _ours(layer, x[0, 300:], states, [90])
    assert _rel(ours_more, hf_more[0]) < 1e-4
    assert _rel(states[0], cache.get_linear_cache(1)[0]) < 1e-4
