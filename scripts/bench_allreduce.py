"""Tiling-AllReduce benchmark: how much of the row-parallel AllReduce the tiled path hides.

For Llama-7B's row-parallel projections (out = hidden 4096; in_local = 4096/TP for o_proj and
11008/TP for down_proj) and T tokens, it times, per rank (the reported figure is the slowest rank):

    compute    x @ W.T alone (for the "mlp" rows: the whole MLP block, gate/up + SiLU + down,
               which the model tiles together so the AllReduce hides behind all of it)
    allreduce  one AllReduce of the [T, 4096] output alone
    plain      linear_all_reduce(num_tiles=1): compute, then one AllReduce
    tiled/n    linear_all_reduce(num_tiles=n): tile i's AllReduce in flight during tile i+1

and reports ``exposed = (tiled - compute) / allreduce``: 0 means the communication is fully hidden,
1 means nothing is (the plain path). ``model`` is the tile count collectives/tile_model.py picks from
the link and compute figures collectives/cost.py measured at start-up.

Modes::

    python scripts/bench_allreduce.py --backend gloo --world 2   # spawned CPU processes
    python scripts/bench_allreduce.py --backend mpi --world 2    # re-runs itself under mpiexec -n 2
    python scripts/bench_allreduce.py --backend nccl --world 2   # spawned processes, one GPU each
    python scripts/bench_allreduce.py --simulate                 # ONE GPU, SIMULATED communication

``--simulate`` replaces the AllReduce with a kernel of the duration a ring AllReduce of that size
would take at ``--bus-gbps`` (nccl-tests busbw convention) on a second CUDA stream: a spin kernel
(``torch.cuda._sleep``, holds one SM: an optimistic bound on interference) or, with
``--sim-kind copy``, a device-to-device copy (uses memory bandwidth and many SMs: a pessimistic
bound). It measures the overlap machinery (streams, events, tile sizes), not a network.

Results go to ``benchmarks/results/allreduce-<device>-<backend>.json`` with the command, device,
date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from collectives.base import Communicator, Handle  # noqa: E402
from collectives.tiled_allreduce import linear_all_reduce  # noqa: E402

HIDDEN = 4096
INTERMEDIATE = 11008
WORKER_FLAG = "--_worker"


# -- measurement ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, comm: Communicator | None) -> float:
    """Seconds of one call, all ranks starting together (barrier), device work included."""
    _sync(device)
    if comm is not None:
        comm.barrier()
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _bench_shape(
    comm: Communicator,
    device: torch.device,
    dtype: torch.dtype,
    rows: int,
    in_local: int,
    tiles: list[int],
    iters: int,
    barrier_comm: Communicator | None,
    budget_s: float = 0.0,
    max_rounds: int = 20,
    mlp: bool = False,
) -> dict[str, float]:
    """Median seconds of each variant on this rank; the variants interleave so drift hits all.

    ``mlp``: the whole MLP block (gate/up + SiLU as the down projection's per-tile prologue), as
    the model runs it, instead of the down matmul alone.
    """
    gen = torch.Generator().manual_seed(comm.rank)
    width = HIDDEN if mlp else in_local
    x = (torch.randn(rows, width, generator=gen) / width**0.5).to(device, dtype)
    w = torch.randn(HIDDEN, in_local, generator=gen).to(device, dtype)
    prologue = None
    if mlp:
        wgu = (torch.randn(2 * in_local, HIDDEN, generator=gen) / HIDDEN**0.5).to(device, dtype)

        def prologue(t: torch.Tensor) -> torch.Tensor:
            gate, up = (t @ wgu.T).chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up

    buf = torch.zeros(rows, HIDDEN, device=device, dtype=dtype)
    variants = {
        "compute": lambda: (prologue(x) if prologue else x) @ w.T,
        "allreduce": lambda: comm.all_reduce(buf),
        "plain": lambda: linear_all_reduce(x, w, comm, num_tiles=1, prologue=prologue),
    }
    for n in tiles:
        variants[f"tiled/{n}"] = lambda n=n: linear_all_reduce(
            x, w, comm, num_tiles=n, prologue=prologue
        )
    # one warm-up round (allocations, connections); its length sets how many rounds fit the budget
    warm = sum(_timed(fn, device, barrier_comm) for fn in variants.values())
    if barrier_comm is not None:  # every rank must run the same number of rounds
        warm = _slowest_rank(comm, {"warm": warm}, device)["warm"]
    rounds = max(iters, min(max_rounds, int(budget_s / max(warm, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_timed(fn, device, barrier_comm))
    # best of the rounds: on a shared host the noise only ever adds time
    times = {k: min(v) for k, v in samples.items()}
    times["rounds"] = rounds
    return times


def _slowest_rank(
    comm: Communicator, times: dict[str, float], device: torch.device
) -> dict[str, float]:
    keys = sorted(times)
    local = torch.tensor([[times[k] for k in keys]], dtype=torch.float64, device=device)
    every = comm.all_gather(local, dim=0).cpu()  # [world, variants]; NCCL needs device tensors
    return dict(zip(keys, every.max(dim=0).values.tolist()))


def run_benchmark(
    comm: Communicator,
    device: torch.device,
    dtype: torch.dtype,
    args: argparse.Namespace,
    barrier_comm: Communicator | None,
    model_costs: tuple[float, float, float, float] | None,
) -> list[dict]:
    from collectives.tile_model import choose_num_tiles

    rows_out = []
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = [("o_proj", HIDDEN // args.tp), ("down_proj", INTERMEDIATE // args.tp)]
    shapes += [("mlp", INTERMEDIATE // args.tp)]
    shapes += [("narrow", n) for n in args.extra_in]
    for proj, in_local in shapes:
        for rows in args.tokens:
            t = _bench_shape(
                comm,
                device,
                dtype,
                rows,
                in_local,
                args.tiles,
                args.iters,
                barrier_comm,
                args.budget_s,
                mlp=proj == "mlp",
            )
            rounds = int(t.pop("rounds"))
            if barrier_comm is not None:
                t = _slowest_rank(comm, t, device)
            tiled = {k: v for k, v in t.items() if k.startswith("tiled/")}
            best = min(tiled, key=tiled.get)
            row = {
                "proj": proj,
                "tokens": rows,
                "in_local": in_local,
                "out": HIDDEN,
                "allreduce_mib": rows * HIDDEN * elem / 2**20,
                "rounds": rounds,
                "ms": {k: round(v * 1e3, 3) for k, v in t.items()},
                "best_tiles": int(best.split("/")[1]),
                "exposed_plain": (t["plain"] - t["compute"]) / t["allreduce"],
                "exposed_tiled": {
                    k.split("/")[1]: (v - t["compute"]) / t["allreduce"] for k, v in tiled.items()
                },
                "exposed_best": (tiled[best] - t["compute"]) / t["allreduce"],
            }
            if model_costs is not None:
                bw, lat, flops, weight_rate = model_costs
                row["model_tiles"] = choose_num_tiles(
                    rows,
                    HIDDEN,
                    in_local * (3 if proj == "mlp" else 1),
                    elem,
                    args.tp,
                    bw,
                    lat,
                    flops,
                    max_tiles=max(args.tiles),
                    weight_read_rate=weight_rate,
                )
            rows_out.append(row)
            if comm.rank == 0:
                print(_format_row(row, args.tiles), flush=True)
    return rows_out


# -- reporting -----------------------------------------------------------------------------------


def _header(tiles: list[int]) -> str:
    cols = ["proj", "T", "in", "AR MiB", "compute", "allreduce", "plain"]
    cols += [f"tiled/{n}" for n in tiles] + ["exposed plain", "exposed best (n)", "model n"]
    return " | ".join(cols)


def _format_row(r: dict, tiles: list[int]) -> str:
    ms = r["ms"]
    cells = [r["proj"], str(r["tokens"]), str(r["in_local"]), f"{r['allreduce_mib']:.0f}"]
    cells += [f"{ms[k]:.1f}" for k in ("compute", "allreduce", "plain")]
    cells += [f"{ms[f'tiled/{n}']:.1f}" for n in tiles]
    cells += [f"{r['exposed_plain']:.2f}", f"{r['exposed_best']:.2f} ({r['best_tiles']})"]
    cells.append(str(r.get("model_tiles", "-")))
    return " | ".join(cells)


def _device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    m = re.search(r"(H100|H200|A100|V100|L40S?|A10G?|T4)", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        model = platform.processor()
    return f"{model or 'cpu'} ({os.cpu_count()} cores)"


def _versions(backend: str) -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    if backend == "mpi":
        import mpi4py
        from mpi4py import MPI

        v["mpi4py"] = mpi4py.__version__
        v["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    return v


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unmeasurably small cost is written as null."""
    return value if value == value and abs(value) != float("inf") else None


def write_results(args, device, backend: str, rows: list[dict], extra: dict) -> Path:
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"allreduce-{_device_slug(device)}-{backend}.json"
    doc = {
        "benchmark": "tiling-allreduce (scripts/bench_allreduce.py)",
        "command": args.command,
        "device": _device_name(device),
        "backend": backend,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(backend),
        "settings": {
            "world": args.world,
            "tp": args.tp,
            "dtype": args.dtype,
            "iters": args.iters,
            "budget_s": args.budget_s,
            "timing": "per variant, the best of `rounds` rounds (after one warm-up); slowest rank",
            "load_average_1m_at_start": args.load_at_start,
            "threads_per_rank": torch.get_num_threads(),
            "load_average_1m_at_end": os.getloadavg()[0],  # other work on the host skews CPU runs
            **extra,
        },
        "exposed": "(tiled - compute) / allreduce; 0 = communication fully hidden, 1 = none hidden",
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path.relative_to(REPO)}", flush=True)
    return path


# -- real groups: gloo / nccl (spawned) and mpi (mpiexec) ---------------------------------------


def _rank_main(rank: int, args: argparse.Namespace, rendezvous: dict) -> None:
    from collectives.cost import measure_link, measure_matmul_costs
    from collectives.factory import create_communicator

    torch.set_num_threads(args.threads)
    if args.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    comm = create_communicator(args.backend, rank, args.world, rendezvous, device)
    try:
        bw, lat = measure_link(
            comm, device, large_bytes=(8 << 20) if device.type == "cpu" else 64 << 20
        )
        probe = (32, 512) if device.type == "cpu" else (256, 8192)
        flops, weight_rate = measure_matmul_costs(device, dtype, HIDDEN, HIDDEN // args.tp, probe)
        if rank == 0:
            print(
                f"{args.backend} world {args.world} on {_device_name(device)}: link "
                f"{bw / 1e9:.2f} GB/s busbw, {lat * 1e6:.0f} us latency; matmul "
                f"{flops / 1e9:.1f} GFLOP/s, weight read {weight_rate / 1e9:.1f} GB/s per rank; "
                f"{torch.get_num_threads()} thread(s)/rank",
                flush=True,
            )
            print(_header(args.tiles) + "  (ms: slowest rank, best round)", flush=True)
        rows = run_benchmark(comm, device, dtype, args, comm, (bw, lat, flops, weight_rate))
        if rank == 0:
            extra = {
                "link_busbw_gbps": bw / 1e9,
                "link_latency_us": lat * 1e6,
                "matmul_gflops_per_rank": flops / 1e9,
                "matmul_weight_read_gbps_per_rank": _finite(weight_rate / 1e9),
            }
            if args.backend == "mpi":
                extra["MPIR_CVAR_ASYNC_PROGRESS"] = os.environ.get("MPIR_CVAR_ASYNC_PROGRESS", "0")
            write_results(args, device, args.backend, rows, extra)
    finally:
        comm.close()


def _launch_spawned(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    from collectives.factory import open_rendezvous

    rendezvous = dict(open_rendezvous(args.backend), timeout_s=600)
    mp.spawn(_rank_main, args=(args, rendezvous), nprocs=args.world, join=True)


def _launch_mpi(args: argparse.Namespace, argv: list[str]) -> None:
    from cluster.mpi_env import find_mpiexec

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["TILERUN_BENCH_COMMAND"] = args.command
    env["TILERUN_BENCH_LOAD"] = str(args.load_at_start)
    if args.mpi_async_progress:
        env["MPIR_CVAR_ASYNC_PROGRESS"] = "1"  # MPICH's progress thread
    cmd = [find_mpiexec(), "-n", str(args.world), sys.executable, __file__, *argv, WORKER_FLAG]
    sys.exit(subprocess.call(cmd, env=env))


def _mpi_worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != args.world:
        raise SystemExit(f"expected {args.world} MPI ranks, got {world.Get_size()}")
    _rank_main(world.Get_rank(), args, {"mode": "world"})


# -- one GPU, simulated communication -----------------------------------------------------------


class _EventHandle(Handle):
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def wait(self) -> None:
        # the caller's stream waits for the simulated transfer; the host does not block
        torch.cuda.current_stream().wait_event(self._event)


class SimulatedAllReduce(Communicator):
    """SIMULATED communicator: ``all_reduce`` enqueues, on the *current* stream, a kernel lasting
    as long as a ring AllReduce of that many bytes over ``world_size`` ranks at ``bus_bw`` bytes/s
    plus ``latency_s``. Data is not changed. ``linear_all_reduce`` launches the tiles' AllReduces
    from its side stream, so they overlap the compute stream exactly as NCCL's would."""

    backend = "simulated"

    def __init__(
        self, world_size: int, bus_bw: float, latency_s: float, device: torch.device, kind: str
    ) -> None:
        super().__init__(0, world_size)
        self.bus_bw, self.latency_s, self.device, self.kind = bus_bw, latency_s, device, kind
        if kind == "spin":
            self._rate = self._calibrate(lambda n: torch.cuda._sleep(n), 2_000_000)  # cycles/s
        else:
            self._src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
            self._dst = torch.empty_like(self._src)
            self._rate = self._calibrate(lambda n: self._dst[:n].copy_(self._src[:n]), 256 << 20)

    def _calibrate(self, launch, amount: int) -> float:
        """Units (cycles or bytes) per second of ``launch``, timed with CUDA events."""
        launch(amount)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        rates = []
        for _ in range(5):
            start.record()
            launch(amount)
            end.record()
            end.synchronize()
            rates.append(amount / (start.elapsed_time(end) / 1e3))
        return statistics.median(rates)

    def seconds(self, nbytes: int) -> float:
        p = self.world_size
        return self.latency_s + 2.0 * (p - 1) / p * nbytes / self.bus_bw

    def _launch(self, nbytes: int) -> None:
        units = int(self.seconds(nbytes) * self._rate)
        if self.kind == "spin":
            torch.cuda._sleep(max(units, 1))
            return
        while units > 0:  # longer than one buffer: copy it several times
            n = min(units, self._src.numel())
            self._dst[:n].copy_(self._src[:n])
            units -= n

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        self._launch(tensor.numel() * tensor.element_size())
        if not async_op:
            return None
        event = torch.cuda.Event()
        event.record()
        return _EventHandle(event)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        raise NotImplementedError("the simulated communicator only times all_reduce")

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False):
        raise NotImplementedError("the simulated communicator only times all_reduce")

    def barrier(self) -> None:
        torch.cuda.synchronize(self.device)


def _run_simulated(args: argparse.Namespace) -> None:
    from collectives.cost import measure_matmul_costs

    if not torch.cuda.is_available():
        raise SystemExit("--simulate needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    bus_bw = args.bus_gbps * 1e9
    latency = args.latency_us * 1e-6
    sim = SimulatedAllReduce(args.tp, bus_bw, latency, device, args.sim_kind)
    flops, weight_rate = measure_matmul_costs(device, dtype, HIDDEN, HIDDEN // args.tp, (256, 8192))
    print(
        f"SIMULATED communication on ONE GPU ({_device_name(device)}): every AllReduce is a "
        f"{args.sim_kind} kernel lasting what a ring AllReduce over TP={args.tp} takes at "
        f"{args.bus_gbps:g} GB/s busbw + {args.latency_us:g} us; matmul {flops / 1e12:.0f} "
        f"TFLOP/s ({args.dtype})",
        flush=True,
    )
    print(_header(args.tiles) + "  (ms: best round)", flush=True)
    rows = run_benchmark(sim, device, dtype, args, None, (bus_bw, latency, flops, weight_rate))
    extra = {
        "SIMULATED": f"no real communication: a {args.sim_kind} kernel of the modelled duration "
        "on a second CUDA stream stands in for each AllReduce",
        "sim_kind": args.sim_kind,
        "sim_bus_gbps": args.bus_gbps,
        "sim_latency_us": args.latency_us,
        "matmul_tflops": flops / 1e12,
        "matmul_weight_read_gbps": _finite(weight_rate / 1e9),
    }
    write_results(args, device, f"simulated-{args.sim_kind}-tp{args.tp}", rows, extra)


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["gloo", "mpi", "nccl"], default="gloo")
    p.add_argument("--world", type=int, default=2, help="ranks (processes) in the group")
    p.add_argument("--simulate", action="store_true", help="one GPU, SIMULATED AllReduce")
    p.add_argument("--tp", type=int, default=None, help="TP degree for in_local (default: --world)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="T values")
    p.add_argument("--tiles", type=int, nargs="+", default=None, help="tile counts to time")
    p.add_argument(
        "--iters", type=int, default=3, help="timed rounds after one warm-up (best kept)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="per shape: more rounds (up to 20) while they fit this many seconds "
        "(default 6 on CPU, 2 on GPU)",
    )
    p.add_argument(
        "--extra-in",
        type=int,
        nargs="*",
        default=None,
        help="extra in_local sizes (rows labelled 'narrow'): communication-heavy shapes; "
        "default 256 on CPU, where Llama-7B shapes are compute-bound, none on GPU",
    )
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on GPU by default")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--bus-gbps", type=float, default=150.0, help="--simulate: busbw, GB/s")
    p.add_argument("--latency-us", type=float, default=10.0, help="--simulate: per message")
    p.add_argument("--sim-kind", choices=["spin", "copy"], default="spin")
    p.add_argument("--mpi-async-progress", action="store_true", help="MPICH progress thread")
    p.add_argument(WORKER_FLAG, dest="worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = args.simulate or args.backend == "nccl"
    args.tp = args.tp or (2 if args.simulate else args.world)
    args.tokens = args.tokens or ([4096, 8192, 16384, 32768] if on_gpu else [512, 1024, 2048])
    args.tiles = args.tiles or ([2, 4, 8, 16] if on_gpu else [2, 4, 8])
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.budget_s is None:
        args.budget_s = 2.0 if on_gpu else 6.0
    if args.extra_in is None:
        args.extra_in = [] if on_gpu else [256]
    # one thread per rank when the ranks share the host's cores
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.world)
    args.load_at_start = float(os.environ.get("TILERUN_BENCH_LOAD") or os.getloadavg()[0])
    args.command = os.environ.get("TILERUN_BENCH_COMMAND") or " ".join(
        ["python", os.path.relpath(__file__, REPO), *argv]
    )
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.simulate:
        _run_simulated(args)
    elif args.backend == "mpi":
        if args.worker:
            _mpi_worker(args)
        else:
            _launch_mpi(args, argv)
    else:
        _launch_spawned(args)


if __name__ == "__main__":
    main()
