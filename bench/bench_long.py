"""Quality against run length (issue 21 §1): held-out FVE and dead latents of saecache's default TopK and BatchTopK
SAEs against dictionary_learning's and sparsify's own trainers, at checkpoints 1M, 3M, 10M and 20M tokens of ONE
20M-token run per trainer (the checkpoints are points along that run's schedule: saecache's LR decays over the last
half of the 20M run, so its 1M-10M points are at full LR, not what a 1M-token run would end at); saecache's default
also as separate short runs (1M, 3M: their own schedules) to compare.

- Data: a store of ≥ 20M unique tokens of the demo model's mlp_out.1, harvested by `saecache harvest` from a larger
  local corpus than the demo's (`corpus`: the demo's sources plus the installed packages' .py/.md/.rst/.txt,
  `data/corpus.py`'s `sitepackages`). 20,000 steps of 1,024 rows (BOS rows left out) read each training row at most
  once. saecache trains with its own CLI (`saecache train`, every default left unset); the peers read the rows its
  loader serves that run (`dump`: bench_quality's `dump_training_rows`, raw fp16), in the same order and batches,
  through bench/quality_peers.py's "long" op in their own Python (dl: dictionary_learning's TopK/BatchTopK trainers;
  sparsify-signum: sparsify's default recipe).
- Measured at each checkpoint (bench_quality's definitions): FVE, L0 and dead % on the store's held-out rows, and
  dead % train: latents that never fire on the training rows of the last 1,000 steps (~1M rows). At the end, %
  loss recovered with its interval (`saecache evaluate`) of saecache's run dirs.
- Resumable: saecache's runs resume from their checkpoints (bit-identical), the peers from the state they save every
  1,000 steps (safetensors + JSON); every checkpoint's row is appended to long.json as soon as it is measured and a
  rerun skips what is there. Scratch (store, dump, runs): saecache-demo/bench-long/ (git-ignored).

Usage (in order; each step resumes or is a no-op when done; run them under `nice -n 19`):
  python -m bench.bench_long corpus                  # ~110 MB of text, its token count with the model's tokenizer
  python -m bench.bench_long harvest                 # saecache harvest, 21.5M rows of mlp_out.1, fp16
  python -m bench.bench_long dump                    # the training rows in order (~5 GB) + the held-out rows
  python -m bench.bench_long run saecache-topk       # then sparsify-signum-topk --python P, dl-topk --python P,
                                                     # saecache-batchtopk, dl-batchtopk, saecache-topk-1m/-3m
  python -m bench.bench_long loss                    # % loss recovered of the finished saecache runs;
                                                     # `loss dl-topk --python P` for a finished peer run
  python -m bench.bench_long report                  # long.md + long.png from long.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bench.bench_quality import dump_training_rows, heldout_rows, metrics
from bench.quality_peers import evaluate

STEPS, BATCH, K, WIDTH, HOOK = 20_000, 1024, 32, 4096, "mlp_out.1"
CHECKPOINTS = (1_000, 3_000, 10_000, 20_000)  # steps; × 1,024 rows = 1.02M, 3.07M, 10.2M, 20.5M tokens
WINDOW = 1_000  # steps: "dead % train" counts latents silent over the training rows of the last WINDOW steps
POLL_S = 30  # seconds between looks for a new checkpoint of a saecache run
HARVEST_TOKENS = 21_500_000  # ≥ 20.3M non-BOS training rows after the 1 % held out
ADAM = ("--sae-options", '{"optimizer": "adam"}')  # saecache's optimizer before lazy-adam became the TopK default
GAO4X = ("--lr", "1.6e-3")  # 4x Gao et al.'s rate at F=4096: the TopK default before 6x
W1000, W300 = ("--warmup-steps", "1000"), ("--warmup-steps", "300")  # the warm-up before the TopK family's 100 cap


class Run(NamedTuple):
    """One trainer's run: who trains, which arch, its schedule's steps, extra `saecache train` args; a probe also
    stops at `until` and says what it changed ("patch:": a change tried in the code and not kept, no flag makes it).
    Rows made under earlier defaults give those defaults as flags, so their command remakes them today."""
    trainer: str
    arch: str
    steps: int
    args: tuple[str, ...] = ()
    until: int | None = None
    note: str = ""


TRAINERS = {
    "saecache-topk": Run("saecache", "topk", STEPS),
    "sparsify-signum-topk": Run("sparsify-signum", "topk", STEPS),
    "dl-topk": Run("dl", "topk", STEPS),
    "saecache-batchtopk": Run("saecache", "batchtopk", STEPS),
    "dl-batchtopk": Run("dl", "batchtopk", STEPS),
    "saecache-topk-1m": Run("saecache", "topk", 1_000),  # short runs: their own (short) schedule
    "saecache-topk-3m": Run("saecache", "topk", 3_000),
    # the defaults before 6x and the 100-step warm-up (lazy Adam at 4x, warm-up min(1000, T/10)), for the record
    "saecache-topk-4x": Run("saecache", "topk", STEPS, GAO4X + W1000),
    "saecache-batchtopk-4x": Run("saecache", "batchtopk", STEPS, GAO4X + W1000),
    "saecache-topk-4x-1m": Run("saecache", "topk", 1_000, GAO4X),
    "saecache-topk-4x-3m": Run("saecache", "topk", 3_000, GAO4X + W300),
    # the defaults before lazy-adam (Adam at 4x), for the record
    "saecache-topk-adam": Run("saecache", "topk", STEPS, GAO4X + W1000 + ADAM),
    "saecache-topk-adam-1m": Run("saecache", "topk", 1_000, GAO4X + ADAM),
    "saecache-topk-adam-3m": Run("saecache", "topk", 3_000, GAO4X + W300 + ADAM),
}
PROBES = {  # saecache on the 20M schedule with one setting changed from the defaults of their day, stopped early
    "probe-topk-through": Run("saecache", "topk", STEPS, GAO4X + W1000 + ADAM, 3_000,
                              "patch: AuxK's gradient straight through the ReLU to dead latents"),
    "probe-topk-lr2x": Run("saecache", "topk", STEPS, ("--lr", "8e-4") + W1000 + ADAM, 3_000,
                           "2x Gao et al.'s rate instead of 4x"),
    "probe-topk-auxk10k": Run("saecache", "topk", STEPS, GAO4X + W1000 + (
        "--sae-options", '{"dead_tokens_threshold": 10240, "optimizer": "adam"}'), 3_000,
        "AuxK on latents silent for 10,240 rows instead of 204,800"),
    "probe-topk-auxk10k-a8": Run("saecache", "topk", STEPS, GAO4X + W1000 + (
        "--sae-options", '{"dead_tokens_threshold": 10240, "auxk_alpha": 0.125, "optimizer": "adam"}'), 3_000,
        "that, and AuxK's weight 1/8 instead of 1/32"),
    "probe-topk-w100-invsqrt1000": Run("saecache", "topk", STEPS, GAO4X + ("--warmup-steps", "100") + ADAM, 3_000,
                                       "warm-up 100 steps; patch: LR x sqrt(1000 / step) after step 1000"),
    "probe-topk-w100-invsqrt500": Run("saecache", "topk", STEPS, GAO4X + ("--warmup-steps", "100") + ADAM, 3_000,
                                      "warm-up 100 steps; patch: LR x sqrt(500 / step) after step 500"),
    "probe-topk-lazyadam": Run("saecache", "topk", STEPS, GAO4X + W1000 + (
        "--sae-options", '{"optimizer": "lazy-adam"}'), 3_000, "lazy Adam"),
    "probe-topk-lazyadam-w100": Run("saecache", "topk", STEPS, GAO4X + ("--warmup-steps", "100", "--sae-options",
                                                                        '{"optimizer": "lazy-adam"}'), 3_000,
                                    "lazy Adam, warm-up 100 steps"),
}


def run_of(name: str) -> Run:
    """The run of a trainer or probe name (looked up when asked, so a caller may swap TRAINERS)."""
    return PROBES[name] if name in PROBES else Run(*TRAINERS[name])


def paths(scratch: Path) -> dict:
    return {"corpus": scratch / "corpus", "store": scratch / "store.zarr", "rows": scratch / "rows.f16",
            "offsets": scratch / "offsets.npy", "heldout": scratch / "heldout.npy", "dump": scratch / "dump.json",
            "runs": scratch / "runs", "state": scratch / "peer-state", "eval": scratch / "eval"}


# -------------------------------------------------------------------------------------------------------- results
def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": [], "commands": [], "loss": {}}


def save_results(path: Path, result: dict) -> None:
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def record(path: Path, row: dict) -> None:
    """Append one measured row (replacing an earlier one of the same trainer and step). Several runs go side by
    side: the read-modify-write holds an exclusive lock on a file beside the results."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = load_results(path)
        result["rows"] = [r for r in result["rows"] if (r["trainer"], r["step"]) != (row["trainer"], row["step"])]
        result["rows"].append(row)
        save_results(path, result)
    print(json.dumps(row), flush=True)


def measured(path: Path, trainer: str) -> set[int]:
    return {r["step"] for r in load_results(path)["rows"] if r["trainer"] == trainer}


# --------------------------------------------------------------------------------------------------------- stages
def build_corpus(p: dict, model: str, max_bytes: int) -> dict:
    from tokenizers import Tokenizer

    from saecache.data.corpus import DEFAULT_SOURCES, build_pile_corpus, read_pile_jsonl_zst

    info = build_pile_corpus(p["corpus"], max_bytes=max_bytes, heldout_fraction=0.02,
                             include=DEFAULT_SOURCES + ("sitepackages",))
    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    texts = [d["text"] for d in read_pile_jsonl_zst(info["train"])]
    info["train_tokens"] = sum(len(e.ids) for i in range(0, len(texts), 256)
                               for e in tok.encode_batch(texts[i:i + 256]))
    info = {k: str(v) if isinstance(v, Path) else v for k, v in info.items()}
    (p["corpus"] / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def harvest_command(p: dict, model: str) -> list[str]:
    return [sys.executable, "-m", "saecache", "harvest", "--out", str(p["store"]), "--model", model,
            "--dataset", str(p["corpus"] / "train.jsonl.zst"), "--hooks", HOOK, "--ctx-len", "128",
            "--tokens", str(HARVEST_TOKENS), "--dtype", "float16", "--device", "cpu", "--encode-workers", "1",
            "--quiet"]


def dump(p: dict, hook: str) -> dict:
    """The training rows of the 20M run in order, the held-out rows; dump.json marks it done."""
    if p["dump"].exists():
        return json.loads(p["dump"].read_text())
    d, ms = dump_training_rows(str(p["store"]), hook, STEPS * BATCH, BATCH, p["rows"].parent)
    np.save(p["heldout"], heldout_rows(str(p["store"]), hook))
    info = {"d": d, "mean_sq_norm": ms, "rows": int(np.load(p["offsets"])[-1])}
    p["dump"].write_text(json.dumps(info) + "\n")
    return info


def store_note(p: dict) -> str:
    """What the store holds, for the results: its rows and the corpus it was harvested from."""
    from saecache.harvest.store import Store

    corpus = json.loads((p["corpus"] / "corpus.json").read_text()) if (p["corpus"] / "corpus.json").exists() else {}
    sets = ", ".join(f"{k} {v:,}" for k, v in corpus.get("sets", {}).items())
    return (f"{p['store']}: {Store.open(str(p['store'])).geometry.n_rows:,} rows of the demo model's {HOOK} (fp16, "
            f"ctx 128), harvested from a {corpus.get('bytes', 0) / 1e6:.0f} MB local corpus of "
            f"{corpus.get('train_tokens', 0):,} training tokens (documents: {sets}).")


def window_rows(p: dict, d: int, step: int) -> np.ndarray:
    """The training rows of steps [step - WINDOW, step) (a memmap)."""
    off = np.load(p["offsets"])
    rows = np.memmap(p["rows"], dtype=np.float16, mode="r").reshape(-1, d)
    return rows[off[max(0, step - WINDOW)]:off[step]]


def saecache_checkpoint(run_dir: Path, step: int):
    """x -> (x_hat, f) of a saecache checkpoint, in raw activation units (the normalisation folded back)."""
    from saecache.train.crosslayer import config_from_dict
    from saecache.train.rundir import load_checkpoint, read_cfg
    from saecache.train.sae import SAE

    cfg = read_cfg(str(run_dir))
    model, _, _ = load_checkpoint(str(run_dir), step)
    sae = SAE.from_state(config_from_dict(cfg["sae"]), model)
    sae.fold_scale(cfg["normalization"]["in_scale"], cfg["normalization"]["out_scale"])
    sae.eval()
    return lambda x: (sae(x), sae.encode(x))


def train_command(p: dict, name: str) -> list[str]:
    _, arch, steps, extra, _, _ = run_of(name)
    return [sys.executable, "-m", "saecache", "train", "--store", str(p["store"]), "--hook", HOOK, "--arch", arch,
            "--width", str(WIDTH), "--k", str(K), "--tokens", str(steps * BATCH), "--batch-size", str(BATCH),
            "--checkpoint-every", str(min(CHECKPOINTS[0], steps)),
            "--keep-checkpoints", str(steps // CHECKPOINTS[0] + 2),
            "--out", str(p["runs"] / name), "--no-progress", *extra]


def run_dir_of(p: dict, name: str) -> Path | None:
    """The run dir `saecache train` made for trainer `name` (its one SAE's, named by arch, hook and width)."""
    found = sorted((p["runs"] / name).glob("*/cfg.json"))
    return found[0].parent if found else None


def run_saecache(p: dict, name: str, res_path: Path, x_held: np.ndarray, d: int) -> None:
    """Train (or resume) with saecache's CLI in a child process, measuring each checkpoint as it appears."""
    steps, until = run_of(name).steps, run_of(name).until
    wanted = [s for s in CHECKPOINTS if s <= until] if until else CHECKPOINTS if steps == STEPS else (steps,)
    todo = [s for s in wanted if s not in measured(res_path, name)]
    if not todo:
        return
    child = subprocess.Popen(train_command(p, name), env={**os.environ, "SAECACHE_THREADS": "1"})
    t0 = time.time()
    while todo:
        from saecache.train.rundir import list_checkpoints

        run_dir = run_dir_of(p, name)
        ready = [s for s in todo if run_dir and s in list_checkpoints(str(run_dir))]
        for s in ready:
            run = saecache_checkpoint(run_dir, s)
            res = evaluate(run, x_held)
            res["train_counts"] = evaluate(run, window_rows(p, d, s), counts_only=True)["counts"]
            record(res_path, {"trainer": name, "step": s, "tokens": s * BATCH, "schedule_steps": steps,
                              **metrics(x_held, res), "wall_s_since_start": round(time.time() - t0)})
            todo.remove(s)
        if todo and child.poll() is not None:
            raise SystemExit(f"bench_long: saecache train exited ({child.returncode}) before step {todo[0]}")
        if todo:
            time.sleep(POLL_S)
    if until:
        child.terminate()  # a probe stops at its last step; the run dir keeps its checkpoints
    child.wait()


def run_peer(p: dict, name: str, res_path: Path, x_held: np.ndarray, d: int, python: str) -> None:
    """Train (or resume) a peer in its own Python (quality_peers' "long" op), up to each checkpoint in turn."""
    peer, arch, steps = run_of(name)[:3]
    worker = subprocess.Popen([python, str(Path(__file__).with_name("quality_peers.py"))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, "OMP_NUM_THREADS": "1"})
    off = np.load(p["offsets"])
    try:
        for s in [s for s in CHECKPOINTS if s not in measured(res_path, name)]:
            req = {"op": "long", "name": peer, "arch": arch, "width": WIDTH, "k": K, "seed": 0, "d": d,
                   "data": str(p["rows"]), "offsets": str(p["offsets"]), "heldout": str(p["heldout"]),
                   "state_dir": str(p["state"] / name), "until": s, "save_every": 1000,
                   "window": [int(off[s - WINDOW]), int(off[s])], "result": str(p["state"] / f"{name}.npz")}
            worker.stdin.write(json.dumps(req) + "\n")
            ans = next((json.loads(x[2:]) for x in worker.stdout if x.startswith("@@")), None)
            if ans is None or "error" in ans:
                raise SystemExit(f"bench_long: {name}: {ans and ans['error'] or 'the worker exited'}")
            res = dict(np.load(p["state"] / f"{name}.npz"))
            record(res_path, {"trainer": name, "step": s, "tokens": s * BATCH, "schedule_steps": steps,
                              **metrics(x_held, res), "train_s_this_piece": round(ans["seconds"])})
    finally:
        worker.stdin.close()
        worker.wait(timeout=600)


def _evaluate(p: dict, run_dir: Path, out: Path, n_contexts: int) -> dict:
    """saecache evaluate of one run dir: its report row (% loss recovered with its interval, FVE, L0...)."""
    subprocess.run([sys.executable, "-m", "saecache", "evaluate", str(run_dir), "--store", str(p["store"]),
                    "--out", str(out), "--n-contexts", str(n_contexts), "--no-frontier", "--no-histograms",
                    "--html-features", "0", "--no-progress", "--threads", "1"], check=True)
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    return row


def _import_peer(p: dict, name: str, python: str, d: int) -> Path | None:
    """The peer's SAE at the end of its run as a saecache run dir (quality_peers' long_export, a dictionary_learning
    save dir, then `saecache import`); None when its run has not reached the end."""
    peer, arch, steps = run_of(name)[:3]
    if not (p["state"] / name / f"step-{steps:09d}").is_dir():
        return None
    src, run_dir = p["eval"] / name / "dictionary_learning", p["eval"] / name / "run"
    req = {"op": "long_export", "name": peer, "arch": arch, "width": WIDTH, "k": K, "seed": 0, "d": d,
           "data": str(p["rows"]), "offsets": str(p["offsets"]), "state_dir": str(p["state"] / name),
           "out": str(src)}
    out = subprocess.run([python, str(Path(__file__).with_name("quality_peers.py"))], input=json.dumps(req) + "\n",
                         capture_output=True, text=True, check=True).stdout
    ans = next(json.loads(x[2:]) for x in out.splitlines() if x.startswith("@@"))
    if "error" in ans:
        raise SystemExit(f"bench_long: exporting {name}: {ans['error']}")
    if not (run_dir / "cfg.json").exists():
        subprocess.run([sys.executable, "-m", "saecache", "import", str(src), "--out", str(run_dir), "--hook", HOOK,
                        "--store", str(p["store"]), "--name", name], check=True)
    return run_dir


def loss_recovered(p: dict, res_path: Path, n_contexts: int, trainer: str | None, python: str | None,
                   d: int) -> None:
    """% loss recovered with its interval (saecache evaluate) at the end of each finished run: every saecache run,
    or the one peer `trainer` (its SAE imported through dictionary_learning's format; needs `python`)."""
    names = [trainer] if trainer else [n for n in TRAINERS if run_of(n).trainer == "saecache"]
    for name in names:
        if name in load_results(res_path)["loss"]:
            continue
        if run_of(name).trainer == "saecache":
            run_dir = run_dir_of(p, name)
            run_dir = run_dir if run_dir and (run_dir / "sae.safetensors").exists() else None
        elif not python:
            raise SystemExit(f"bench_long loss {name}: pass --python, the peer's Python")
        else:
            run_dir = _import_peer(p, name, python, d)
        if run_dir is None:
            print(f"bench_long loss: {name} has not finished its run", file=sys.stderr)
            continue
        row = _evaluate(p, run_dir, p["eval"] / name / "report", n_contexts)
        result = load_results(res_path)
        result["loss"][name] = row
        save_results(res_path, result)


# --------------------------------------------------------------------------------------------------------- report
def targets(rows: list[dict]) -> list[dict]:
    """Per arch and checkpoint of the 20M schedule: saecache's FVE ≥ the best peer's; at the end also its dead %
    train ≤ the lowest peer's + 1 point."""
    out = []
    for arch in ("topk", "batchtopk"):
        for s in CHECKPOINTS:
            at = {r["trainer"]: r for r in rows if r["step"] == s and r["schedule_steps"] == STEPS
                  and run_of(r["trainer"]).arch == arch}
            ours, peers = at.get(f"saecache-{arch}"), [r for n, r in at.items() if not n.startswith("saecache")]
            if not ours or not peers:
                continue
            own = next((r for r in rows if r["trainer"] == f"saecache-{arch}-{s // 1000}m" and r["step"] == s
                        and r["schedule_steps"] == s), None)  # saecache's own run of this length, if measured
            best = max(peers, key=lambda r: r["fve"])
            t = {"arch": arch, "step": s, "tokens": s * BATCH, "fve": ours["fve"], "best_peer": best["trainer"],
                 "peer_fve": best["fve"], "margin": round(ours["fve"] - best["fve"], 5),
                 "fve_met": ours["fve"] >= best["fve"], "peers": sorted(r["trainer"] for r in peers)}
            if own:
                t.update(own_run_fve=own["fve"], own_run_met=own["fve"] >= best["fve"])
            if s == CHECKPOINTS[-1]:
                low = min(peers, key=lambda r: r["dead_train_pct"])
                t.update(dead_train_pct=ours["dead_train_pct"], lowest_dead_peer=low["trainer"],
                         peer_dead_train_pct=low["dead_train_pct"],
                         dead_met=ours["dead_train_pct"] <= low["dead_train_pct"] + 1.0)
            out.append(t)
    return out


def write_report(res_path: Path, out: Path) -> dict:
    result = load_results(res_path)
    rows = sorted((r for r in result["rows"] if r["trainer"] in TRAINERS),
                  key=lambda r: (list(TRAINERS).index(r["trainer"]), r["step"]))
    probes = sorted((r for r in result["rows"] if r["trainer"] in PROBES),
                    key=lambda r: (list(PROBES).index(r["trainer"]), r["step"]))
    result["targets"] = targets(rows)
    save_results(res_path, result)
    meta = result.get("meta", {})
    lines = ["# Quality against run length (bench/bench_long.py, issue 21 §1)", "",
             f"Store: {meta.get('store_note', '')} Hook {HOOK}, TopK-family k={K}, F={WIDTH}, batches of {BATCH} "
             f"rows (BOS rows left out), one 20,000-step run per trainer measured at steps "
             f"{', '.join(map(str, CHECKPOINTS))} (1.02M / 3.07M / 10.2M / 20.5M tokens): the checkpoints are points "
             "along one schedule (saecache's LR decays over the last half of the 20M run; the peers' schedules are "
             "their own for 20,000 steps), except the `-1m`/`-3m` rows, separate runs with their own short schedule. "
             "saecache's TopK family trains with lazy Adam at 6x Gao et al.'s rate with an LR warm-up of at most "
             "100 steps (its defaults since this bench); the `-4x` rows are the defaults before that (lazy Adam at "
             "4x, warm-up of a tenth of the run up to 1000 steps), the `-adam` rows those before lazy Adam (Adam at "
             "4x). sparsify's signum is schedule-free: its point at N tokens is what a run of N tokens gives, so the "
             "like-for-like saecache figure at 1M and 3M is its own run of that length. "
             f"Held-out rows: {meta.get('heldout_rows', 0):,}; dead % train: never fires on the training rows of "
             "the last 1,000 steps (~1M rows). 1 torch thread per trainer, niced on a shared machine.", "",
             "| trainer | schedule steps | step | tokens | FVE | L0 | dead % held-out | dead % train (last 1M) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['schedule_steps']:,} | {r['step']:,} | {r['tokens']:,} | "
                     f"{r['fve']:.4f} | {r['l0']:.1f} | {r['dead_pct']} | {r.get('dead_train_pct', '–')} |")
    if probes:
        lines += ["", "Probes: saecache on the same 20M schedule with one setting changed, stopped early (the default "
                  "run's rows above at the same step are the reference):", "",
                  "| probe | change | step | FVE | L0 | dead % held-out | dead % train (last 1M) |",
                  "|---|---|---|---|---|---|---|"]
        for r in probes:
            lines.append(f"| {r['trainer']} | {PROBES[r['trainer']].note} | {r['step']:,} | {r['fve']:.4f} | "
                         f"{r['l0']:.1f} | {r['dead_pct']} | {r.get('dead_train_pct', '–')} |")
    lines += ["", "Target (issue 21): at every checkpoint saecache's FVE ≥ the best peer's; at the end its dead % "
              "train ≤ the lowest peer's + 1 point.", ""]
    for t in result["targets"]:
        dead = (f"; dead % train {t['dead_train_pct']} vs {t['lowest_dead_peer']} {t['peer_dead_train_pct']}: "
                f"{'met' if t['dead_met'] else 'NOT met'}") if "dead_met" in t else ""
        lines.append(f"- {t['arch']} step {t['step']:,}: saecache {t['fve']:.4f} vs {t['best_peer']} "
                     f"{t['peer_fve']:.4f} (margin {t['margin']:+.4f}, peers measured: {', '.join(t['peers'])}): "
                     f"{'met' if t['fve_met'] else 'NOT met'}{dead}"
                     + (f"; saecache's own {t['step'] // 1000}M-token run {t['own_run_fve']:.4f}: "
                        f"{'met' if t['own_run_met'] else 'NOT met'}" if "own_run_fve" in t else ""))
    missing = [f"{n} step {s:,}" for n, (_, _, st, *_) in TRAINERS.items()
               for s in (CHECKPOINTS if st == STEPS else (st,)) if s not in measured(res_path, n)]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    if result.get("loss"):
        lines += ["", f"% loss recovered at the end (`saecache evaluate`, zero-ablation baseline, 95 % bootstrap "
                  "interval over the evaluated contexts):", "", "| trainer | % loss recovered | [lo, hi] | FVE | L0 |",
                  "|---|---|---|---|---|"]
        for name, row in result["loss"].items():
            lines.append(f"| {name} | {100 * row['recovered_zero']:.1f} | [{100 * row['recovered_zero_lo']:.1f}, "
                         f"{100 * row['recovered_zero_hi']:.1f}] | {row.get('fve', float('nan')):.4f} | "
                         f"{row.get('l0', float('nan')):.1f} |")
    lines += ["", "Commands, in the order they ran. Rows were renamed when a default changed, so that each name's "
              "command remakes its rows today: the `saecache-topk-adam*` rows were made by the first `run "
              "saecache-topk`, `-1m` and `-3m` (Adam, the default then); the `-4x` rows by the next `run "
              "saecache-topk`, `-1m`, `-3m` and `run saecache-batchtopk` (lazy Adam at 4x); today's `saecache-topk`, "
              "`saecache-batchtopk` and `saecache-topk-1m` rows by `run probe-topk-lr6x-w100`, "
              "`probe-batchtopk-lr6x-w100` and `probe-topk-1m-lr6x`, which passed today's defaults as flags "
              "(`--lr 2.4e-3 --warmup-steps 100`; the 1M run's warm-up is 100 steps either way), and today's "
              "`saecache-topk-3m` row by `run saecache-topk-3m` run again. The % loss recovered entries follow their "
              "rows' names. A command is listed once, where it first ran:", ""] + \
        [f"    {c}" for c in result.get("commands", [])]
    (out / "long.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "long.png")
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    floor, below = 0.94, 0  # points below the floor (early peers) are drawn on it, with their value
    for i, (name, (_, _, steps, *_)) in enumerate(TRAINERS.items()):
        rs = [r for r in rows if r["trainer"] == name]
        if not rs:
            continue
        xs, ys = [r["tokens"] for r in rs], [max(r["fve"], floor) for r in rs]
        color = plt.get_cmap("tab20")(i % 20)
        if steps == STEPS:
            ax.plot(xs, ys, marker="o", label=name, color=color, ls="-" if "batchtopk" not in name else "--")
        else:
            ax.plot(xs, ys, marker="*", ms=12, ls="none", color=color, label=f"{name} (own schedule)")
        for r in rs:
            if r["fve"] < floor:
                ax.annotate(f"{name} {r['fve']:.3f} ↓", (r["tokens"], floor), fontsize=7, xytext=(6, 4 + 10 * below),
                            textcoords="offset points")
                below += 1
    ax.set_ylim(bottom=floor - 0.002)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out FVE")
    ax.set_title(f"{HOOK}, F={WIDTH}, k={K}: FVE along one 20M-token run per trainer")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="?", default="report",
                    choices=("corpus", "harvest", "dump", "run", "loss", "report"),
                    help="default: report (what `make bench` runs: the long runs are started by hand)")
    ap.add_argument("trainer", nargs="?", choices=[*TRAINERS, *PROBES], help="with `run`")
    ap.add_argument("--python", default=os.environ.get("SAECACHE_PEERS_PYTHON"),
                    help="the peer's Python (dictionary_learning's or sparsify's environment) for a peer trainer")
    ap.add_argument("--scratch", default="saecache-demo/bench-long")
    ap.add_argument("--model", default="saecache-demo/model", help="the demo model (`saecache demo` builds it)")
    ap.add_argument("--corpus-bytes", type=int, default=110_000_000)
    ap.add_argument("--n-contexts", type=int, default=256, help="contexts spliced for % loss recovered")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    p, out = paths(Path(args.scratch)), Path(args.out)
    res_path = out / "long.json"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.stage != "report" and not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"bench_long: no model at {args.model}; run `python -m saecache demo` first or pass --model")
    command = "python -m bench.bench_long " + " ".join(sys.argv[1:] if argv is None else argv)
    result = load_results(res_path)
    if command not in result["commands"] and args.stage != "report":
        result["commands"].append(command)
        save_results(res_path, result)
    if args.stage == "corpus":
        print(json.dumps(build_corpus(p, args.model, args.corpus_bytes)))
    elif args.stage == "harvest":
        subprocess.run(harvest_command(p, args.model), check=True, env={**os.environ, "SAECACHE_THREADS": "1"})
    elif args.stage == "dump":
        info = dump(p, HOOK)
        result = load_results(res_path)
        result["meta"] = {**result.get("meta", {}), **info, "heldout_rows": int(len(np.load(p["heldout"],
                                                                                          mmap_mode="r")))}
        save_results(res_path, result)
    elif args.stage == "run":
        if args.trainer is None:
            raise SystemExit(f"bench_long run: name a trainer: {', '.join(TRAINERS)}")
        if not p["dump"].exists():
            raise SystemExit("bench_long run: the training rows are not dumped yet; run `python -m bench.bench_long "
                             "dump` first")
        d = json.loads(p["dump"].read_text())["d"]
        x_held = np.load(p["heldout"])
        if run_of(args.trainer).trainer == "saecache":
            run_saecache(p, args.trainer, res_path, x_held, d)
        elif not args.python:
            raise SystemExit(f"bench_long run {args.trainer}: pass --python, the peer's Python")
        else:
            run_peer(p, args.trainer, res_path, x_held, d, args.python)
    elif args.stage == "loss":
        d = json.loads(p["dump"].read_text())["d"] if p["dump"].exists() else None
        loss_recovered(p, res_path, args.n_contexts, args.trainer, args.python, d)
    if args.stage in ("dump", "report") and p["store"].exists():
        result = load_results(res_path)
        result["meta"] = {**result.get("meta", {}), "store_note": store_note(p)}
        save_results(res_path, result)
    if args.stage in ("dump", "run", "loss", "report"):
        write_report(res_path, out)


if __name__ == "__main__":
    main()
