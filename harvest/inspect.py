"""Looking at a store without changing it (read-only: works with read-only credentials): `info` (what a newcomer
needs to trust it: model, revision, tokenizer, data, contexts, seed, hooks, codec, rows, who wrote it when with which
version, derivation, fingerprint), `verify` (recompute every shard checksum, find missing and corrupt shards, a
final record that disagrees with the manifest) and on-disk size."""

from __future__ import annotations


from saecache.errors import StoreError
from saecache.harvest.store import (
    ACTS_DIR, DTYPES, Store, aggregate_stats, check_object, final_key, manifest_key,
)

FORMAT_NOTE = {"int8": ", rows of a float32 scale + int8 codes", "nf4": ", rows of a float32 scale + 4-bit NF4 codes"}


def store_size(url: str | Store, storage_options: dict | None = None) -> dict:
    """Bytes of the store's array objects and bytes per stored activation value."""
    store = url if isinstance(url, Store) else Store.open(url, storage_options, cache=None)
    acts_bytes = 0
    for entry in store.manifest().values():
        acts_bytes += sum(o["nbytes"] for k, o in entry["objects"].items() if k.startswith(f"{ACTS_DIR}/"))
    total = 0
    for entry in store.manifest().values():
        total += sum(o["nbytes"] for o in entry["objects"].values())
    g = store.geometry
    done_rows = sum(store.geometry.shard_row_range(s)[1] - store.geometry.shard_row_range(s)[0]
                    for s in store.complete_shards())
    values = done_rows * sum(h["d"] for h in store.hooks.values())
    return {"rows": done_rows, "rows_planned": g.n_rows, "bytes_on_disk": total, "acts_bytes": acts_bytes,
            "bytes_per_value": acts_bytes / values if values else float("nan")}


def store_info(url: str, storage_options: dict | None = None) -> dict:
    store = Store.open(url, storage_options, cache=None)
    h, g = store.header, store.geometry
    writers = sorted({(e["writer"]["host"], e["writer"]["package_version"]) for e in store.manifest().values()})
    workers = sorted({e["writer"].get("worker", "0/1") for e in store.manifest().values()})
    times = sorted(e["writer"]["time"] for e in store.manifest().values())
    fp, final = store.fingerprint(), store.final
    return {
        "url": store.url,
        "format_version": h["format_version"],
        "model": h["model"], "tokenizer": h["tokenizer"], "dataset": h["dataset"],
        "ctx_len": h["ctx_len"], "bos_policy": h["bos_policy"], "seed": h["seed"],
        "hooks": h["hooks"], "storage": h["storage"],
        "shards": {"complete": len(store.complete_shards()), "total": g.n_shards},
        "complete": store.is_complete,
        "written_by": [{"host": w[0], "package_version": w[1]} for w in writers],
        "workers": workers,
        "written_between": [times[0], times[-1]] if times else None,
        "created_by_version": h.get("package_version"),
        "derived_from": h.get("derived_from"),
        "fingerprint": fp,
        "final_fingerprint_matches": None if final is None else final.get("fingerprint") == fp,
        "quant_error": quant_error(store),
        **store_size(store),
    }


def quant_error(store: Store) -> dict[str, float] | None:
    """Per hook, the relative MSE Σ‖x - x̂‖² / Σ‖x‖² of the stored values against the exact activations, as the
    harvest measured it (over the complete shards); None for stores that did not record it (format version 1)."""
    try:
        return {h: aggregate_stats(store.manifest(), h)["rel_mse"] for h in sorted(store.hooks)}
    except (KeyError, StoreError):
        return None


def format_info(info: dict) -> str:
    m, t, d, st = info["model"], info["tokenizer"], info["dataset"], info["storage"]
    lines = [
        f"store        {info['url']}  (format v{info['format_version']})",
        f"model        {m['name']} @ {m.get('revision') or 'default revision'}  [{m['architecture']}, {m['dtype']}, "
        f"config sha256 {str(m['config_hash'])[:12]}]",
        f"tokenizer    {t.get('name')}  (vocab {t.get('vocab_size')}, bos {t.get('bos_token_id')}, "
        f"eos {t.get('eos_token_id')})",
        f"data         {d['spec']}  split={d['split']} field={d['text_field']}  "
        f"fingerprint {str(d['fingerprint'])[:12]}",
        f"contexts     ctx_len {info['ctx_len']}, seed {info['seed']}; {info['bos_policy']}",
        f"format       {st['dtype']} ({DTYPES[st['dtype']][0]} on disk{FORMAT_NOTE.get(st['dtype'], '')}), codec "
        f"{st['codec']}, shards of {st['shard_rows']} rows, inner chunks of {st['chunk_rows']} rows",
        "hooks        " + ", ".join(f"{k} (d={v['d']}, {v['module']}:{v['io']})" for k, v in info["hooks"].items()),
        f"rows         {info['rows']:,} of {info['rows_planned']:,}; shards {info['shards']['complete']}/"
        f"{info['shards']['total']} {'(complete)' if info['complete'] else '(INCOMPLETE: rerun the harvest)'}",
        f"size         {info['bytes_on_disk']:,} bytes; {info['bytes_per_value']:.3f} bytes per activation value",
        "written by   " + ", ".join(f"{w['host']} (saecache {w['package_version']})" for w in info["written_by"])
        + (f" as worker(s) {', '.join(info['workers'])}" if info.get("workers") else "")
        + (f" between {info['written_between'][0]} and {info['written_between'][1]}"
           if info["written_between"] else ""),
    ]
    if info.get("quant_error"):
        lines.append("stored error relative MSE vs the exact activations: " + ", ".join(
            f"{h} {v:.2e}" for h, v in info["quant_error"].items()))
    if info.get("derived_from"):
        d = info["derived_from"]
        lines.append(f"derived from {d['url']} (hooks {', '.join(d['kept_hooks'])} of {', '.join(d['hooks'])}; "
                     f"fingerprint {d['fingerprint'][:16]}…)")
    check = {None: "", True: " (matches the final record)",
             False: " (DOES NOT MATCH the final record: manifest changed after completion; run `saecache verify`)"}
    lines.append(f"fingerprint  {info['fingerprint']}{check[info.get('final_fingerprint_matches')]}")
    return "\n".join(lines)


def verify_store(url: str, storage_options: dict | None = None) -> list[str]:
    """Every problem found, one line each (empty = healthy): missing shards, missing, resized or corrupt objects."""
    store = Store.open(url, storage_options, cache=None)
    problems = []
    manifest = store.manifest()
    for s in range(store.geometry.n_shards):
        if s not in manifest:
            problems.append(f"shard {s}: missing (no manifest entry: never written or interrupted)")
            continue
        for key, want in sorted(manifest[s]["objects"].items()):
            data = store.loc.get(key)
            problem = check_object(key, data, want) or store.object_problem(key, data)
            if problem is not None:
                problems.append(f"shard {s}: {problem}")
    for s in sorted(manifest):  # the entries read_manifest checked (each names the shard its key names)
        if s >= store.geometry.n_shards:
            problems.append(f"manifest entry {manifest_key(s, store.version).split('/')[1]} names a shard beyond the "
                            f"store's {store.geometry.n_shards}")
    final = store.final
    if final is not None and final.get("fingerprint") != store.fingerprint():
        problems.append(f"{final_key(store.version)} records fingerprint {str(final.get('fingerprint'))[:16]}… but "
                        f"the manifest gives {store.fingerprint()[:16]}…: shards were changed after the store was "
                        "completed")
    return problems
