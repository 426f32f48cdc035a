"""Training batches from activation stores: random inner chunks → shuffle windows → ``[B, D]`` tensors.

Never reads random single rows (each would decode a whole compressed inner chunk). The order is a pure function of
(seed, epoch, the stores' complete shards, ``partitions``, ``shuffle_chunks``, ``shuffle_run``):

1. units = every inner chunk of every complete shard of every store, with the rows the run's `Split` trains on
   (``chunks.training_units``): minus the held-out contexts, and minus the BOS rows unless the run trains on them.
   This row selection is the one place BOS rows are dropped, so a batch never holds one and every batch has
   ``batch_size`` rows (the BOS rows' share is made up by more rows of the store, not by smaller batches);
2. per epoch, units are permuted with ``default_rng([seed, epoch])`` and dealt round-robin to ``partitions``
   canonical partitions (fixed by the config, NOT by the number of ranks or threads);
3. each partition reads its units in groups of ``shuffle_chunks`` (a window), cuts the window's rows into runs of
   ``shuffle_run`` adjacent stored rows (stored rows are already shuffled within their shard), permutes the runs
   with a generator seeded per (partition, window) from the epoch's generator, and serves their rows as a stream
   that runs on into the partition's share of the next epoch (nothing is dropped at an epoch's end: partitions hold
   slightly different row counts, so each partition turns its epochs at its own batch);
4. global batch ``b`` = ``B / partitions`` consecutive rows of every partition's stream, partitions in order.

A DDP rank reads only its contiguous block of partitions (rank r of W: ``[r·P/W, (r+1)·P/W)``), so the ranks' reads
are disjoint and gathering the local batches in rank order gives exactly the global batch of one process.
Resume state is ``{"batches_served", "seed"}`` (batches since the start, every epoch included; ``epoch`` rides along
for information): resuming recomputes each partition's position and skips rows without reading them. Reader threads only decode chunks ahead of time; results are consumed in the fixed order, so thread
counts never change the batches. Held out = the last ``heldout_fraction`` of contexts by context id (rows of a shard
that straddles the cut are filtered by ``rows/context``); `Split.heldout_batches` serves exactly those rows to
evaluate.

Data path (one copy per row into the batch, plus the cast): a compressed chunk is decoded by a reader thread straight
into its slot of a per-partition window buffer (recycled: two live per partition); an uncompressed local chunk is not
read at all, the window points into the memory-mapped shard file (no thread handoff either). A batch is built on the
consumer thread by copying each partition's share run by run from the window sources (memory-bound: a second thread
measured slower), then cast once when the requested dtype differs from storage (on one thread: torch's intra-op pool
stalls on a busy core).
"""

from __future__ import annotations

import bisect
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from saecache.errors import ConfigError, StoreError
from saecache.harvest.split import Split
from saecache.harvest.store import Store
from saecache.train.chunks import (BITS, META, TORCH, ChunkReader, open_stores, single_threaded,  # noqa: F401
                                   split_units, to_torch, training_units)

TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MIN_PIECE = 64  # rows: the smallest piece a small store's inner chunks are cut into (see Loader._fit_small_store)


def run_plan(rows: list[int], run: int, rng: np.random.Generator) -> tuple[list, list, list, list]:
    """A window's serving order, as runs of adjacent stored rows: per run (unit, first row in the unit, length) in
    serving order, and each run's serving position. Each unit is cut into runs of ``run`` rows at a random shift (so
    the runs differ between epochs; the piece before the shift is a shorter run), then all runs are permuted. Stored
    rows are already a random permutation of their shard (SPEC.md, pre-shuffle), so a run is a random sample of its
    shard, and a batch's rows are copied a run at a time (random single rows are DRAM-latency bound)."""
    rows_U = np.asarray(rows, dtype=np.int64)
    shift_U = np.where(rows_U > run, rng.integers(0, run, len(rows_U)), 0)
    count_U = (shift_U > 0) + (rows_U - shift_U + run - 1) // run  # runs per unit
    unit_R = np.repeat(np.arange(len(rows_U)), count_U)
    k_R = np.arange(int(count_U.sum())) - np.repeat(np.cumsum(count_U) - count_U, count_U)  # run index in its unit
    shift_R, lead_R = np.repeat(shift_U, count_U), np.repeat(shift_U > 0, count_U)
    start_R = np.where(lead_R, np.where(k_R == 0, 0, shift_R + (k_R - 1) * run), k_R * run)
    end_R = np.minimum(np.where(lead_R & (k_R == 0), shift_R, start_R + run), np.repeat(rows_U, count_U))
    order = rng.permutation(len(unit_R))
    length = (end_R - start_R)[order]
    return unit_R[order].tolist(), start_R[order].tolist(), length.tolist(), (np.cumsum(length) - length).tolist()


def _run_gathers(jobs: list) -> None:
    """``(window, hook, pieces, out)``: copy each piece ``(unit, row, n)`` of the window's rows to ``out`` in turn."""
    for win, h, pieces, out in jobs:
        srcs, o = win.srcs[h], 0
        for m, r, n in pieces:
            out[o:o + n] = srcs[m][r:r + n]
            o += n


class _Window:
    """One shuffle window being read: per hook and unit, the unit's rows (a view of the mapped shard file, or a
    slice of a recycled ``base`` buffer the readers decode into), served as runs (``run_plan``), never copied."""

    def __init__(self, base: dict[str, np.ndarray], rows: list[int], run: int, rng: np.random.Generator):
        self.base, self.n = base, sum(rows)
        self.bufs = {h: b[:self.n] for h, b in base.items()}
        self.offs = np.cumsum([0] + rows)  # window row of each unit's first row, then n
        self.futures: list = []
        self.r_unit, self.r_start, self.r_len, self.r_first = run_plan(rows, run, rng)
        self.srcs: dict[str, list[np.ndarray]] = {}  # per hook: the storage bits of each unit

    def wait(self) -> None:
        views = [f.result() if hasattr(f, "result") else f for f in self.futures]  # re-raises a reader's error here
        for h, buf in self.bufs.items():
            bits = BITS[buf.dtype.itemsize]
            self.srcs[h] = [v[h].view(bits) if h in v else buf[o0:o1].view(bits)
                            for v, o0, o1 in zip(views, self.offs[:-1].tolist(), self.offs[1:].tolist())]

    def pieces(self, i: int, j: int) -> list[tuple[int, int, int]]:
        """Serving positions ``[i, j)`` as ``(unit, first row in the unit, n)`` pieces (whole runs, except where the
        range cuts one)."""
        out, first = [], self.r_first
        for r in range(bisect.bisect_right(first, i) - 1, bisect.bisect_left(first, j)):
            f, n = first[r], self.r_len[r]
            a, b = max(i, f), min(j, f + n)
            out.append((self.r_unit[r], self.r_start[r] + a - f, b - a))
        return out


class Loader:
    """Iterator of training batches: ``dict hook -> [B_local, D] tensor`` (the same rows for every hook; the names
    in ``META`` give the rows' context/position/token ids as int64 ``[B_local]``).

    ``batch_size`` is the GLOBAL batch; on rank ``r`` of ``world_size`` the local batch holds the rows of partitions
    ``[r·P/W, (r+1)·P/W)`` (rank order = partition order, so gathered local batches = the one-process batch).
    Call ``state_dict()`` after consuming a batch to record the position. ``split`` is the run's `Split` (held-out
    contexts and BOS rows left out); without one, ``heldout_fraction`` alone holds out contexts and BOS rows are
    served like any other.
    """

    def __init__(self, stores: list[Store], hooks: list[str], batch_size: int, seed: int = 0, *,
                 heldout_fraction: float = 0.0, partitions: int = 8, shuffle_chunks: int = 4, shuffle_run: int = 128,
                 reader_threads: int = 2, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1, direct: bool = True, state: dict | None = None,
                 split: Split | None = None):
        if batch_size % partitions:
            raise ConfigError(f"--batch-size {batch_size} must be a multiple of --partitions {partitions}")
        if partitions % world_size:
            raise ConfigError(f"--partitions {partitions} must be a multiple of the number of ranks {world_size}")
        self.stores, self.hooks, self.batch_size, self.seed = stores, list(hooks), batch_size, seed
        self.partitions, self.shuffle_chunks, self.dtype = partitions, shuffle_chunks, dtype
        # each partition's share of a batch spans at least 4 runs (batch 4096 / 8 partitions: runs of 128 rows)
        self.shuffle_run = max(1, min(shuffle_run, batch_size // partitions // 4))
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.logical = stores[0].logical_dtype
        self.split = split or Split(heldout_fraction, train_on_bos=True)
        self.units = training_units(stores, self.split)
        self.per_part = batch_size // partitions
        per_rank = partitions // world_size
        self.my_parts = list(range(rank * per_rank, (rank + 1) * per_rank))
        self._readers = [ChunkReader(st, self.hooks, direct) for st in stores]
        # per hook: (row shape, numpy dtype, logical dtype) of the window buffers: storage dtype for acts (a
        # quantized row is its uint8 scale + codes), int64 meta
        self._buf_spec = {h: ((), np.dtype(np.int64), "int64") if h in META else
                          (*stores[0].row_format(h), self.logical) for h in self.hooks}
        self._window_cap = shuffle_chunks * max((u.n for u in self.units), default=0)
        self._pool = ThreadPoolExecutor(reader_threads) if reader_threads > 0 else None
        self.batches_served = 0  # since the start of training, every epoch included
        self._plans: dict[int, tuple] = {}
        self._fit_small_store()
        if state is not None:
            self.load_state_dict(state)
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._queue: queue.Queue | None = None

    def _fit_small_store(self) -> None:
        """A store with too few inner chunks to give every partition its share of a batch: its chunks are cut into
        pieces (halving until every partition's share of the first epoch holds a batch share, or pieces reach
        ``MIN_PIECE`` rows). Only stores that could not serve a batch are cut; every other store's order is
        unchanged. What still does not fit gets an error naming the largest batch size that does."""
        whole, pieces = self.units, 1
        rows = sum(u.rows for u in whole)
        while self.batches_per_epoch(0) == 0 and max((u.n for u in whole), default=0) // (2 * pieces) >= MIN_PIECE:
            pieces *= 2
            self.units, self._plans = split_units(whole, pieces), {}
        if self.batches_per_epoch(0) == 0:
            fits = self.partitions * min(sum(self.units[u].rows for w in part for u in w)
                                         for part in self._epoch_plan(0))
            hint = (f"use --batch-size {fits} or less (a multiple of --partitions {self.partitions})" if fits else
                    "fewer --partitions")
            raise StoreError(f"too few training rows ({rows}) for batch_size {self.batch_size} over "
                             f"{self.partitions} partitions: {hint}, or harvest more")
        self._window_cap = self.shuffle_chunks * max((u.n for u in self.units), default=0)

    # -- order (pure functions of seed, epoch, units)
    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """plan[p][w] = unit indices of window w of partition p."""
        return self._plan_and_length(epoch)[0]

    def _plan_and_length(self, epoch: int) -> tuple[list[list[list[int]]], int, np.ndarray]:
        """(plan, batches in the epoch, seed of each window's run order ``[partition, window]``)."""
        got = self._plans.get(epoch)
        if got is None:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.units))
            plan = []
            for p in range(self.partitions):
                mine = order[p::self.partitions].tolist()
                plan.append([mine[i:i + self.shuffle_chunks] for i in range(0, len(mine), self.shuffle_chunks)])
            n = min(sum(self.units[u].rows for w in part for u in w) for part in plan) // self.per_part
            # one integer seed per window (an integer seeds a generator 10x faster than a list)
            got = (plan, n, rng.integers(0, 2**63, (self.partitions, max(len(part) for part in plan))))
            # partitions turn their epochs at different batches: keep a few recent epochs (dict swap: thread-safe)
            self._plans = {e: v for e, v in sorted(self._plans.items())[-7:]} | {epoch: got}
        return got

    def batches_per_epoch(self, epoch: int) -> int:
        """Batches of ``epoch`` served before its smallest partition share runs out (the rows beyond it are served
        too, at the start of the next epoch's batches: see the module docstring)."""
        return self._plan_and_length(epoch)[1]

    def _locate(self, p: int, rows: int) -> tuple[int, int]:
        """(epoch, row offset in it) of partition p's stream after it has served ``rows`` rows."""
        epoch = 0
        while rows >= (n := sum(self._window_rows(w) for w in self._epoch_plan(epoch)[p])):
            rows, epoch = rows - n, epoch + 1
        return epoch, rows

    @property
    def epoch(self) -> int:
        """The epoch the first partition is in at the current position (for information: each partition turns its
        epochs at its own batch)."""
        return self._locate(0, self.batches_served * self.per_part)[0]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_served": self.batches_served, "seed": self.seed, "continuous": True}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ConfigError(f"loader state is for seed {state['seed']}, not {self.seed}")
        served = int(state["batches_served"])
        if not state.get("continuous"):  # an older saecache counted per epoch (and dropped each epoch's tail)
            served += sum(self.batches_per_epoch(e) for e in range(int(state["epoch"])))
        self.batches_served = served
        self.__dict__.pop("_gen", None)  # restart the stream at the new position

    # -- reading: each row is decoded once into a recycled window buffer, then gathered once into its batch
    def _window_rows(self, unit_ids: list[int]) -> int:
        return sum(self.units[u].rows for u in unit_ids)

    def _submit(self, epoch: int, p: int, w: int, free: dict) -> _Window | None:
        """Start reading window w of partition p into a free buffer set (``free[p]``: buffers no batch still needs)."""
        plan = self._epoch_plan(epoch)[p]
        if w >= len(plan):
            return None
        units = [self.units[u] for u in plan[w]]
        n = sum(u.rows for u in units)
        pool = free.setdefault(p, [])
        base = next((b for b in pool if len(b[self.hooks[0]]) >= n), None)
        if base is None:
            cap = max(n, self._window_cap)
            base = {h: np.empty((cap, *tail), dtype=dt) for h, (tail, dt, _) in self._buf_spec.items()}
        else:
            pool.remove(base)
        win = _Window(base, [u.rows for u in units], self.shuffle_run,
                      np.random.default_rng(int(self._plan_and_length(epoch)[2][p, w])))
        for u, off in zip(units, win.offs[:-1].tolist()):
            reader = self._readers[u.src]
            views = reader.views(u, check=False)  # zero-copy hooks: nothing to read here; their check (crc32c)
            if len(views) == len(self.hooks):   # runs on a reader thread
                win.futures.append(self._pool.submit(reader.check_views, u, views) if self._pool else
                                   reader.check_views(u, views))
                continue
            def read(r=reader, u=u, off=off, v=views):
                r.check_views(u, v)
                r.read(u, win.bufs, off, skip=v)
                return v  # the unit's sources: these views, and the window buffer for every other hook

            win.futures.append(self._pool.submit(read) if self._pool else read())
        return win

    def _partition_stream(self, p: int, start_batch: int, free: dict):
        """Yield partition p's endless stream from global batch ``start_batch`` on, ``per_part`` rows at a time, as a
        list of ``(window, i, j)`` segments: serving positions ``[i, j)`` of the window. A segment is valid until
        the generator is resumed (then its window's buffers may be refilled). The last window of an epoch runs on
        into the first of the next (read ahead like any other window), so no row of an epoch is dropped."""
        epoch, skip = self._locate(p, start_batch * self.per_part)
        plan, w = self._epoch_plan(epoch)[p], 0
        while skip >= (n := self._window_rows(plan[w])):
            skip, w = skip - n, w + 1
        pool, live = free.setdefault(p, []), {}  # live: windows whose buffers a batch or a reader may still use
        pending = self._submit(epoch, p, w, free)
        segs, have = [], 0
        try:
            while pending is not None:
                win, pending = pending, None
                live[id(win)] = win
                win.wait()
                i, skip = skip, 0
                while i < win.n:
                    k = min(self.per_part - have, win.n - i)
                    segs.append((win, i, i + k))
                    have, i = have + k, i + k
                    if have == self.per_part:
                        yield segs
                        for x, _, _ in segs:  # served: buffers of fully served windows are free again
                            if (x is not win or i == win.n) and id(x) in live:
                                pool.append(live.pop(id(x)).base)
                        segs, have = [], 0
                        if pending is None:  # read the next window (into the buffers just freed)
                            pending = self._submit_next(epoch, p, w, free)
                if pending is None:
                    pending = self._submit_next(epoch, p, w, free)
                w += 1
                if w == len(self._epoch_plan(epoch)[p]):
                    epoch, w = epoch + 1, 0
        finally:  # end of the epoch or stream closed: recycle every buffer no reader is still writing. Never wait
            # here: this also runs when the garbage collector finalises an abandoned stream, in whatever thread it
            # happens to run in (zarr's event-loop thread included, which a pending zarr read needs: a deadlock)
            if pending is not None and all(f.done() for f in pending.futures if hasattr(f, "done")):
                live[id(pending)] = pending
            pool.extend(x.base for x in live.values())

    def _submit_next(self, epoch: int, p: int, w: int, free: dict) -> _Window:
        """Start reading window w + 1; after the last window of the epoch, the next epoch's first one."""
        return self._submit(epoch, p, w + 1, free) or self._submit(epoch + 1, p, 0, free)

    def _batches(self):
        """Torch batches from the current position on: every (hook, partition share) is copied run by run from its
        window's sources into the batch's storage bits, then cast once when the requested dtype differs."""
        start = self.batches_served  # a local copy: the consumer may lag (prefetch thread)
        free: dict[int, list] = {}  # per partition: window buffers no batch needs any more
        stage: dict[str, torch.Tensor] = {}  # per hook: storage-bits batch when a cast follows (reused)
        n_local = self.per_part * len(self.my_parts)
        streams = [self._partition_stream(p, start, free) for p in self.my_parts]
        try:
            while True:
                pieces, o = [], 0  # (window, its pieces, first batch row)
                for s in streams:
                    for win, i, j in next(s):
                        pieces.append((win, win.pieces(i, j), o))
                        o += j - i
                out, jobs, casts = {}, [], []
                for h in self.hooks:
                    tail, dt, logical = self._buf_spec[h]
                    want = self._want(h)
                    cast = TORCH.get(logical) != want  # quantized formats (not in TORCH) always decode
                    bits = stage.get(h) if cast else None  # a cast reads a reused staging batch
                    if bits is None:
                        bits = torch.empty((n_local, *tail), dtype=TORCH_BITS[dt.itemsize])
                        if cast:
                            stage[h] = bits
                    dst = bits.numpy()
                    jobs += [(win, h, pcs, dst[o:]) for win, pcs, o in pieces]
                    out[h] = bits.view(want) if not cast else None
                    if cast:
                        casts.append((h, bits))
                _run_gathers(jobs)  # one thread: a second one gains nothing on a memory-bound copy (measured slower)
                for h, src in casts:
                    out[h] = to_torch(src.numpy(), self._buf_spec[h][2], self.stores[0].hooks[h]["d"], self._want(h))
                for h in self.hooks:
                    t = out[h]
                    if self._cuda:
                        t = t.pin_memory().to(self.device, non_blocking=True)
                    elif self.device.type != "cpu":
                        t = t.to(self.device)
                    out[h] = t
                yield out
        finally:
            for s in streams:
                s.close()

    def _want(self, h: str) -> torch.dtype:
        return torch.int64 if h in META else self.dtype

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_gen"):
            self._gen = self._batches() if not self._cuda else self._prefetched()
        batch = next(self._gen)
        self.batches_served += 1
        return batch

    def _prefetched(self):
        """CUDA only: a background thread keeps two pinned batches ready (the GPU never waits on decode)."""
        q: queue.Queue = queue.Queue(maxsize=2)

        def work():
            try:
                for b in self._batches():
                    q.put(b)
            except BaseException as e:  # hand read errors to the consumer instead of leaving it waiting forever
                q.put(e)

        threading.Thread(target=work, daemon=True).start()
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the reader threads and drop the batch stream. The stream's generator refers back to the loader, so
        without this its window buffers (hundreds of MB) live until the cyclic garbage collector runs."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        gen = self.__dict__.pop("_gen", None)
        if gen is not None:
            gen.close()
