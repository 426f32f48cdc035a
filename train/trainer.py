"""The training loop: one read of the data feeds every SAE of a sweep; checkpoints make `kill -9` resumable exactly.

Per step, for every SAE (a `Member`): normalise the batch, loss → backward → (DDP: average gradients) → project
decoder gradients → clip the gradient norm (`TrainConfig.grad_clip`) → set the scheduled LR → Adam step →
renormalise decoder → track dead features → maybe resample.
Resampling and the LR re-warm after it are per SAE (`SAESpec.resample`, resolved by TrainConfig): a member that does
not resample trains exactly as it would alone in a run without resampling.
Everything that influences the weights (data order, initialisation, resampling draws) is a pure function of the
config and seed, and every piece of state is checkpointed, so a resumed run ends bit-identical (CPU) to an
uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import sys
import time

import torch

from saecache import __version__
from saecache.errors import ConfigError, DivergedError, RunDirError
from saecache.harvest.split import Split
from saecache.train import ddp, rundir
from saecache.train.arch import ARCHITECTURES
from saecache.train.config import SAESpec, TrainConfig, flag, upgrade_fields
from saecache.train.crosslayer import CrossLayer, config_from_dict
from saecache.train.loader import Loader, open_stores
from saecache.train.monitor import Logger, check_backend, step_metrics
from saecache.train.optim import lr_factor, make_optimizer, sparsity_warmup_factor
from saecache.train.sae import SAE, SAEConfig, normalisation_scale, save_sae
from saecache.train.resample import resample_dead_
from saecache.train.sparse_ops import Workspace
from saecache.threads import stage_threads

# TrainConfig fields that may change between a run and its resumption without changing the result. Store URLs may
# change (a moved or copied store): the stores' fingerprints, checked in order, are what must stay the same.
RESUMABLE_CHANGES = {"progress", "reader_threads", "log", "log_every", "wandb_project", "device", "out", "stores"}
SPEC_DEFAULTS = {"lr", "warmup_steps", "decay_start"}
"""Run fields that are only defaults of its SAEs' specs: a resume compares what each spec resolved them to."""


@dataclasses.dataclass
class Member:
    """One SAE of the sweep with its optimizer, run dir and bookkeeping."""

    spec: SAESpec
    """The SAE's spec, named after its run dir (`name-seed<r>` for a replica)."""
    sae: SAE
    opt: torch.optim.Optimizer
    run_dir: str
    in_scale: float | list[float]
    """Training sees x / in_scale (sqrt of the hook's mean squared norm, so E‖x‖² = 1); folded back at save. A
    cross-layer member has one per input hook, each from its own statistics."""
    out_scale: float | list[float]
    generator: torch.Generator
    lr: float
    replica: dict | None = None
    """With TrainConfig.seeds > 1: {"of": spec name, "index": r, "seeds": N, "init_seed": ...} (into cfg.json)."""
    done: bool = False


def pooled_mean_sq_norm(stores, hook: str) -> float:
    """Mean squared row norm of a hook over all stores (count-weighted), from the stores' statistics."""
    stats = [st.stats(hook) for st in stores]
    return sum(s["mean_sq_norm"] * s["count"] for s in stats) / sum(s["count"] for s in stats)


def _sae_config(spec: SAESpec, d_in: int, d_out: int) -> SAEConfig:
    return SAEConfig(**{"arch": spec.arch, "d_in": d_in, "width": spec.width, "d_out": d_out,
                        "transcoder": spec.target_hook != spec.hook_in, "k": spec.k, "penalty": spec.penalty,
                        "coeff": spec.coeff, **spec.options})


def _cfg_record(cfg: TrainConfig, m: Member, stores, split: Split, world: int) -> dict:
    return {
        "format_version": rundir.FORMAT_VERSION, "package_version": __version__, "name": m.spec.name,
        "complete": False, "sae": m.sae.cfg.to_dict(), "spec": dataclasses.asdict(m.spec),
        "train": cfg.to_dict(), "seed": cfg.seed, "world_size": world,
        "hooks": ({"in": m.spec.inputs, "out": m.spec.targets, "kind": m.sae.cfg.kind}
                  if isinstance(m.sae, CrossLayer) else {"in": m.spec.hook_in, "out": m.spec.target_hook}),
        "stores": [{"url": rundir.redact_url(st.url), "fingerprint": st.fingerprint()} for st in stores],
        "split": split.record(),
        "normalization": {"in_scale": m.in_scale, "out_scale": m.out_scale,
                          "source": "training saw x / scale, scale = sqrt(mean_sq_norm) from the store statistics; "
                                    "folded back into sae.safetensors (it takes raw activations)"},
        "tokens_seen": 0, "steps_done": 0, **({"replica": m.replica} if m.replica else {}),
    }


def _check_existing(run_dir: str, record: dict, drops_bos: bool = False) -> dict | None:
    """The cfg.json of an earlier run in `run_dir`, after checking it is the same run; None when fresh. `drops_bos`:
    this run leaves BOS rows out of some store; a run started before the loader did so (its cfg.json has no "split")
    dropped them from each batch after reading it, so it resumes on the same rows in another order (one warning)."""
    if not os.path.exists(os.path.join(run_dir, rundir.CFG_FILE)):
        return None
    old = rundir.read_cfg(run_dir)
    started = upgrade_fields(old["train"])  # today's names
    if "warmup_steps" not in old.get("spec", {}) and isinstance(started.get("saes"), list):
        # from before SAESpec.warmup_steps: the run's one resolved warm-up was every SAE's
        started["saes"] = [{**s, "warmup_steps": started.get("warmup_steps")} for s in started["saes"]]
    # the run's lr / warmup_steps / decay_start are defaults of its SAEs: compared as each spec resolved them
    a = {k: v for k, v in started.items() if k not in RESUMABLE_CHANGES | SPEC_DEFAULTS}
    b = {k: v for k, v in record["train"].items() if k not in RESUMABLE_CHANGES | SPEC_DEFAULTS}
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    diff = [flag(k) for k in differ if k != "saes"] + (["saes"] if "saes" in differ else [])  # run flags first
    if "saes" in diff and isinstance(a.get("saes"), list) and len(a["saes"]) == len(b["saes"]):
        diff[-1] = "saes: " + ", ".join(  # which spec field, started and now (a default may have moved)
            f"{sb.get('name')}'s {k} {sa.get(k)!r} (now {sb.get(k)!r})" for sa, sb in zip(a["saes"], b["saes"])
            for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k))
    old_sae = config_from_dict(old["sae"]).to_dict()  # under today's field names
    if old_sae != record["sae"]:  # run settings first: the run's length also resolves SAE fields (dead threshold)
        diff = [k for k in diff if not k.startswith("saes")] + [k for k in record["sae"]
                                                                if old_sae.get(k) != record["sae"][k]]
        raise RunDirError(f"{run_dir} holds a different SAE (differs in {', '.join(diff)}); rerun with the original "
                          "settings or use a new --out")
    if diff:
        raise RunDirError(f"{run_dir} was started with a different config (differs in {'; '.join(diff)}); rerun with "
                          "the original settings (a default that changed since: give the started value, e.g. --lr "
                          "or --warmup-steps) or use a new --out")
    if [s["fingerprint"] for s in old["stores"]] != [s["fingerprint"] for s in record["stores"]]:
        raise RunDirError(f"the store changed since {run_dir} was started (fingerprint differs); use a new --out")
    if "split" not in old and drops_bos:
        print(f"warning: {run_dir} was started by an older saecache, which left the BOS rows out of each batch after "
              "reading it; it resumes with the loader leaving them out (the same rows, in another order from here)",
              file=sys.stderr)
    return old


def member_seed(seed: int, name: str) -> int:
    """Seed of one SAE's initialisation and resampling draws: a pure function of (run seed, SAE name), so an SAE
    trained inside a sweep is bit-identical to the same SAE trained alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def replica_seed(seed: int, name: str, replica: int) -> int:
    """Init (and resampling) seed of replica `replica` of SAE `name`; replica 0 is the SAE trained without replicas."""
    return member_seed(seed, name if replica == 0 else f"{name}/seed{replica}")


def build_members(cfg: TrainConfig, stores, device: torch.device, world: int) -> list[Member]:
    """One Member per SAE and replica: replicas of a spec differ only in the seed of their init and resampling."""
    members, workspace = [], Workspace()  # SAEs step one after another: one set of [B, F] buffers serves them all
    for base, name, r in cfg.replicas():
        spec = _as_started(base if name == base.name else dataclasses.replace(base, name=name), cfg.out)
        seed = replica_seed(cfg.seed, base.name, r)
        d_in, d_out = _hook_width(stores, spec.inputs, spec.name), _hook_width(stores, spec.targets, spec.name)
        cross = ARCHITECTURES[spec.arch].cross_layer
        torch.manual_seed(seed)
        sae = (CrossLayer(spec.cross_layer_config(d_in, d_out)) if cross else SAE(_sae_config(spec, d_in, d_out)))
        sae = sae.to(device)
        sae._workspace = workspace
        lr = spec.lr or cfg.lr
        scale = lambda h: normalisation_scale(pooled_mean_sq_norm(stores, h)) if cfg.normalize else 1.0  # noqa: E731
        in_scale = [scale(h) for h in spec.inputs] if cross else scale(spec.hook_in)
        out_scale = [scale(h) for h in spec.targets] if cross else scale(spec.target_hook)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        replica = {"of": base.name, "index": r, "seeds": cfg.seeds, "init_seed": seed} if cfg.seeds > 1 else None
        m = Member(spec, sae, make_optimizer(sae, lr), os.path.join(cfg.out, spec.name), in_scale, out_scale,
                   gen, lr, replica)
        members.append(m)
    return members


def _as_started(spec: SAESpec, out: str) -> SAESpec:
    """The spec, resuming its run dir with the optimizer it was started with (its cfg.json's, read as
    `config_from_dict` reads it: a record from before `SAEConfig.optimizer` trained with Adam), unless the spec
    names one."""
    run_dir = os.path.join(out, spec.name)
    if "optimizer" in spec.options or not os.path.exists(os.path.join(run_dir, rundir.CFG_FILE)):
        return spec
    started = config_from_dict(rundir.read_cfg(run_dir)["sae"]).optimizer
    return dataclasses.replace(spec, options={**spec.options, "optimizer": started})


def _hook_width(stores, hooks: list[str], name: str) -> int:
    """The width shared by `hooks` (a cross-layer dictionary's hooks must agree)."""
    widths = sorted({stores[0].hooks[h]["d"] for h in hooks})
    if len(widths) > 1:
        raise ConfigError(f"SAE {name}: its hooks {', '.join(hooks)} have different widths {widths}; a cross-layer "
                          "dictionary needs one width for its inputs and one for its targets")
    return widths[0]


def _diverged(m: Member, what: str, hint: str = "lower the lr") -> DivergedError:
    """The one-line divergence error, naming the last good checkpoint that is kept."""
    last = rundir.list_checkpoints(m.run_dir)
    return DivergedError(f"{m.spec.name}: {what}; kept the last good checkpoint "
                         f"({'step ' + str(last[-1]) if last else 'none yet'}); {hint}")


def _require_finite(m: Member, step: int) -> None:
    bad = [n for n, p in m.sae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise _diverged(m, f"{', '.join(bad)} became non-finite by step {step}")


def _checkpoint(m: Member, step: int, loader: Loader, cfg: TrainConfig) -> None:
    opt_tensors, opt_rest = rundir.optimizer_to_flat(m.opt)
    extra = {**opt_tensors, "rng.resample": m.generator.get_state(), "rng.torch": torch.get_rng_state()}
    state = {"format_version": rundir.FORMAT_VERSION, "step": step, "tokens_seen": step * cfg.batch_size,
             "loader": loader.state_dict(), "optimizer": opt_rest}
    rundir.save_checkpoint(m.run_dir, step, m.sae.state_for_save(), extra, state, cfg.keep_checkpoints)


def _restore(m: Member, step: int) -> dict:
    model, extra, state = rundir.load_checkpoint(m.run_dir, step)
    m.sae.load_state_dict(model)
    rundir.optimizer_from_flat(m.opt, {k: v for k, v in extra.items() if k.startswith("optim.")}, state["optimizer"])
    m.generator.set_state(extra["rng.resample"])
    torch.set_rng_state(extra["rng.torch"])
    return state


def _finish(m: Member, record: dict, steps: int, cfg: TrainConfig) -> None:
    """Save raw-activation-space weights (normalisation folded back) and mark cfg.json complete."""
    final = copy.deepcopy(m.sae).cpu()
    final.fold_scale(m.in_scale, m.out_scale)
    tmp = os.path.join(m.run_dir, f".tmp-{rundir.WEIGHTS_FILE}")
    save_sae(final, tmp)
    os.replace(tmp, os.path.join(m.run_dir, rundir.WEIGHTS_FILE))
    rundir.write_json_atomic(os.path.join(m.run_dir, rundir.CFG_FILE),
                             {**record, "complete": True, "steps_done": steps, "tokens_seen": steps * cfg.batch_size})


def train_step(m: Member, batch: dict, step: int, cfg: TrainConfig, total: int, autocast: dict, world: int):
    """One optimizer step of one SAE. Returns the LossOutput (for metrics) and the normalised target. A cross-layer
    member (`CrossLayer`) takes lists of hooks (x_BD, t_BD are lists, one tensor per hook) and its own decoder
    constraint and counters; its target for the metrics is every target hook side by side."""
    cross = isinstance(m.sae, CrossLayer)
    if cross:
        x_BD = [batch[h] / s for h, s in zip(m.spec.inputs, m.in_scale)]
        t_BD = [batch[h] / s for h, s in zip(m.spec.targets, m.out_scale)]
    else:
        x_BD = batch[m.spec.hook_in] / m.in_scale
        t_BD = x_BD if m.spec.target_hook == m.spec.hook_in else batch[m.spec.target_hook] / m.out_scale
    n_global = (x_BD[0] if cross else x_BD).shape[0] * world  # every rank holds batch_size / world rows
    gather = (lambda v: [ddp.all_gather_rows(a) for a in v]) if cross else ddp.all_gather_rows  # noqa: E731
    if step == 0:
        m.sae.init_from_batch(gather(x_BD), gather(t_BD))
    since = [c.clone() for c in m.sae.counters()] if world > 1 else None
    with torch.autocast(**autocast):
        out = m.sae.loss(x_BD, t_BD, sparsity_warmup_factor(step, cfg.sparsity_warmup_steps))
    # a 0/1 flag, not the loss itself: MAX over ranks of a NaN is not reliably NaN, and every rank must stop together
    if ddp.all_reduce_max((~torch.isfinite(out.total.detach())).float()) > 0:
        raise _diverged(m, f"loss became {out.total.item()} at step {step}",
                        "lower the lr or check the store for non-finite rows")
    m.opt.zero_grad(set_to_none=True)
    out.total.backward()  # equal rows per rank: the ranks' averaged gradient is that of the global batch's mean
    ddp.average_gradients(m.sae, world)
    m.sae.project_decoder_grad_()
    if cfg.grad_clip > 0:  # after the averaging: every rank clips the same gradient alike
        torch.nn.utils.clip_grad_norm_(m.sae.parameters(), cfg.grad_clip)
    resample_steps = cfg.resample_steps if m.spec.resample else None
    factor = lr_factor(step, m.spec.warmup_steps, total, m.spec.decay_start, resample_steps)
    for g in m.opt.param_groups:
        g["lr"] = m.lr * factor
    m.opt.step()
    m.sae.renorm_decoder_()
    if world > 1:
        m.sae.sync_stats_(since, n_global)
    if resample_steps and (step + 1) % resample_steps == 0 and step + 1 < total:  # (not into the saved SAE)
        dead_F = m.sae.dead_mask(cfg.dead_tokens_threshold)
        if dead_F.any():
            resample_dead_(m.sae, m.opt, ddp.all_gather_rows(x_BD), ddp.all_gather_rows(t_BD), dead_F, m.generator)
    return out, (torch.cat(t_BD, dim=1) if cross else t_BD)


def run_training(cfg: TrainConfig) -> list[str]:
    """Train every SAE of `cfg`, resuming from the newest common checkpoint. Returns the SAEs' run dirs.
    `_run_training` under saecache's thread policy (`saecache/threads.py`). A failure (or a stop) before an SAE's
    first checkpoint leaves nothing this call created for it (`rundir.remove_new`)."""
    before = rundir.snapshot(cfg.out, [os.path.join(cfg.out, name) for _, name, _ in cfg.replicas()])
    try:
        with stage_threads():
            return _run_training(cfg)
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:  # DDP: rank 0 alone writes run dirs
            rundir.remove_new(before)
        raise


def _run_training(cfg: TrainConfig) -> list[str]:
    check_backend(cfg.log)
    rank, world, device = ddp.setup(cfg.device)
    stores = open_stores(cfg.stores, cfg.hooks, require_complete=not cfg.allow_incomplete)
    ddp.agree_on_shards(stores)  # DDP: every rank reads the shards rank 0 sees published
    members = build_members(cfg, stores, device, world)
    split = Split.for_training(stores, cfg.heldout_fraction, cfg.train_on_bos)
    records = {m.spec.name: _cfg_record(cfg, m, stores, split, world) for m in members}
    drops_bos = any(split.drops_bos(st) for st in stores)
    for m in members:
        old = _check_existing(m.run_dir, records[m.spec.name], drops_bos)
        m.done = bool(old and old.get("complete") and os.path.exists(os.path.join(m.run_dir, rundir.WEIGHTS_FILE)))
    active = [m for m in members if not m.done]
    total = cfg.total_steps
    if not active:
        return [m.run_dir for m in members]
    # the loader checks batch size vs. the training rows: build it before anything is written. Its row selection
    # leaves out the held-out contexts and (unless --train-on-bos) the BOS rows: every batch has batch_size rows
    loader = Loader(stores, cfg.hooks, cfg.batch_size, cfg.seed, split=split,
                    partitions=cfg.partitions, shuffle_chunks=cfg.shuffle_chunks, shuffle_run=cfg.shuffle_run,
                    reader_threads=cfg.reader_threads,
                    device=device, rank=rank, world_size=world)
    ddp.barrier()
    if rank == 0:
        for m in active:
            os.makedirs(os.path.join(m.run_dir, rundir.CKPT_DIR), exist_ok=True)
            rundir.clean_tmp(m.run_dir)
            if not os.path.exists(os.path.join(m.run_dir, rundir.CFG_FILE)):
                rundir.write_json_atomic(os.path.join(m.run_dir, rundir.CFG_FILE), records[m.spec.name])
    ddp.barrier()

    # resume: the newest step every unfinished SAE has a checkpoint for
    common = set.intersection(*(set(rundir.list_checkpoints(m.run_dir)) for m in active))
    start = 0
    if common:
        start = max(common)
        for m in active:
            loader.load_state_dict(_restore(m, start)["loader"])
    if rank == 0:
        for m in active:
            rundir.truncate_metrics(m.run_dir, start)
    logger = Logger(cfg, [m.spec.name for m in active], start, total, enabled=rank == 0)
    autocast = {"device_type": device.type, "dtype": getattr(torch, cfg.autocast),
                "enabled": cfg.autocast != "float32"}
    try:
        t0 = time.perf_counter()
        for step in range(start, total):
            batch = next(loader)
            results = [train_step(m, batch, step, cfg, total, autocast, world) for m in active]
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                recs = [{**step_metrics(out, t, m.sae.dead_mask(cfg.dead_tokens_threshold), step + 1,
                                        cfg.batch_size), "lr": m.opt.param_groups[0]["lr"]}
                        for (out, t), m in zip(results, active)]
                for m, rec in zip(active, recs):  # the same record goes to metrics.jsonl and the logger's backend
                    rundir.append_metrics(m.run_dir, rec)
                logger.log(step + 1, recs, (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0))
            logger.advance()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                for m in active:  # never checkpoint non-finite weights: the last checkpoint must stay good
                    _require_finite(m, step + 1)
                if rank == 0:
                    for m in active:
                        _checkpoint(m, step + 1, loader, cfg)
                ddp.barrier()
        if rank == 0:  # the loop ended with a checkpoint at `total`, so a kill from here on only redoes this
            for m in active:
                _finish(m, records[m.spec.name], total, cfg)
        ddp.barrier()
    finally:
        logger.close()
        loader.close()
    return [m.run_dir for m in members]
