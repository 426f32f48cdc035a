"""Data-parallel training through `torch.distributed` (launched by `torchrun`; NCCL on GPU, gloo on CPU).

The trainer does not wrap SAEs in `DistributedDataParallel`: a sweep holds several SAEs that step together and the
TopK decoders use custom sparse autograd, so gradients are averaged explicitly after `backward()` (one all-reduce per
parameter, the same arithmetic DDP performs). Every helper is a no-op in a single process, so the loop reads the same
with and without DDP.

What equals one process at the same global batch (up to float rounding): the data (rank r reads a contiguous block of
the canonical partitions, so gathering local batches in rank order gives the global batch; which shards of a store
still being harvested are read is rank 0's decision, `agree_on_shards`), gradients of per-row mean losses, the
geometric-median init and resampling (both see the gathered global batch, same RNG on every rank) and the
dead-latent counters. What is per rank, hence only approximately equal: batchtopk's selection (top k·B_local of each
rank's rows) and its inference threshold (mean of the ranks' EMAs), and AuxK's normalisation by the residual variance
of the local batch.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist

from saecache.errors import ConfigError, StoreError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_device(device: str) -> torch.device:
    """`auto` → CUDA when available, else CPU; otherwise the named device, refused (one line) when absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"device {device} is not available ({n} CUDA device(s) here); use --device cpu or auto")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device} is not supported for training; use auto, cpu, cuda or cuda:N")
    return dev


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_distributed():
        dev = resolve_device(device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if not is_distributed():
        return 0, 1, resolve_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = resolve_device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    return rank, world, dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum_int(n: int) -> int:
    """Sum of an integer over ranks (e.g. the global number of rows in a step)."""
    if not is_distributed():
        return n
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([n], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def all_gather_rows(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (the global batch); identity in one process. Ranks may hold
    different numbers of rows (padded for the exchange, trimmed after)."""
    if not is_distributed():
        return x_BD
    world = dist.get_world_size()
    n = torch.tensor([x_BD.shape[0]], dtype=torch.int64, device=x_BD.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    pad = torch.zeros((max(counts), *x_BD.shape[1:]), dtype=x_BD.dtype, device=x_BD.device)
    pad[:x_BD.shape[0]] = x_BD
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def batch_variance(e_BD: torch.Tensor) -> torch.Tensor:
    """Σ_D of the variance of the rows over the global batch (every rank's rows), what one process computes over the
    same rows: a loss normalised by it keeps the rank-averaged gradient equal to one process's (AuxK's)."""
    if not is_distributed():
        return (e_BD - e_BD.mean(0)).pow(2).sum(-1).mean()
    sums = torch.cat([e_BD.sum(0), e_BD.new_tensor([e_BD.shape[0]])])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    n = sums[-1]
    sq = (e_BD - sums[:-1] / n).pow(2).sum().reshape(1)
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    return sq[0] / n


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Mean of every parameter's gradient over ranks (parameters without a gradient count as zero)."""
    if not is_distributed() or world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad.is_sparse:
            p.grad = p.grad.to_dense()
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


@torch.no_grad()
def sync_sae_stats_(sae, since_before_F: torch.Tensor, global_batch: int) -> None:
    """Make the SAE's dead-latent counters (and batchtopk's threshold) those of the global batch on every rank: a
    latent fired if it fired on any rank; counters advance by the global batch's rows, as in one process."""
    fired_F = all_reduce_max((sae.tokens_since_fired_F == 0).to(torch.int64)) > 0
    sae.tokens_since_fired_F.copy_(torch.where(fired_F, 0, since_before_F + global_batch))
    if hasattr(sae, "threshold"):
        t = sae.threshold.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        sae.threshold.copy_(t / dist.get_world_size())


def agree_on_shards(stores) -> None:
    """Every rank trains from rank 0's view of which shards are published (`--allow-incomplete`: a harvest still
    publishing shards can show ranks different sets when each lists the manifest itself). Rank 0 sends its shards and
    a digest of their objects; a rank missing one re-lists its manifest once; a rank that still lacks it, or lists
    other objects for it, stops the run with one line. Messages are JSON bytes (nothing is unpickled)."""
    if not is_distributed():
        return
    digest = lambda e: hashlib.sha256(json.dumps(e["objects"], sort_keys=True).encode()).hexdigest()  # noqa: E731
    mine = [{str(s): digest(st.manifest()[s]) for s in st.complete_shards()} for st in stores]
    agreed = json.loads(_broadcast_bytes(json.dumps(mine).encode()).decode())
    bad = ""
    for st, want in zip(stores, agreed):
        if any(int(s) not in st.manifest() for s in want):
            st.manifest(refresh=True)
        have = st.manifest()
        wrong = [s for s, d in want.items() if int(s) not in have or digest(have[int(s)]) != d]
        if wrong:
            bad = bad or (f"rank {dist.get_rank()} does not see shard(s) {', '.join(wrong[:5])} of {st.url} as rank 0 "
                          "published them; the ranks must read one store (a shared filesystem or bucket)")
        else:
            st.restrict_to_shards(sorted(int(s) for s in want))
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    failed = all_reduce_max(torch.tensor(float(bool(bad)), device=dev))
    if failed > 0:
        raise StoreError(bad or "another rank does not see the shards rank 0 trains from; see its error")


def _broadcast_bytes(data: bytes) -> bytes:
    """Rank 0's bytes on every rank (length first, then a uint8 tensor)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if dist.get_rank() == 0 else \
        torch.empty(int(n), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().numpy())


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
