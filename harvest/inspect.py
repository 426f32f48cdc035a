"""Looking at a store without changing it: `info` (what a newcomer needs to trust it), `verify` (recompute every
shard checksum, find missing and corrupt shards) and on-disk size."""

from __future__ import annotations

import json

from saecache.harvest.store import DTYPES, MANIFEST_DIR, Store, _Location, checksum


def store_size(url: str, storage_options: dict | None = None) -> dict:
    """Bytes of the store's array objects and bytes per stored activation value."""
    store = Store.open(url, storage_options)
    acts_bytes = 0
    for entry in store.manifest().values():
        acts_bytes += sum(o["nbytes"] for k, o in entry["objects"].items() if k.startswith("acts/"))
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
    store = Store.open(url, storage_options)
    h, g = store.header, store.geometry
    writers = sorted({(e["writer"]["host"], e["writer"]["package_version"]) for e in store.manifest().values()})
    times = sorted(e["writer"]["time"] for e in store.manifest().values())
    return {
        "url": url,
        "format_version": h["format_version"],
        "model": h["model"], "tokenizer": h["tokenizer"], "dataset": h["dataset"],
        "ctx_len": h["ctx_len"], "bos_policy": h["bos_policy"], "seed": h["seed"],
        "hooks": h["hooks"], "storage": h["storage"],
        "shards": {"complete": len(store.complete_shards()), "total": g.n_shards},
        "complete": store.is_complete,
        "written_by": [{"host": w[0], "package_version": w[1]} for w in writers],
        "written_between": [times[0], times[-1]] if times else None,
        "fingerprint": store.fingerprint(),
        **store_size(url, storage_options),
    }


def format_info(info: dict) -> str:
    m, t, d, st = info["model"], info["tokenizer"], info["dataset"], info["storage"]
    lines = [
        f"store        {info['url']}  (format v{info['format_version']})",
        f"model        {m['name']} @ {m.get('revision') or 'default revision'}  [{m['architecture']}, {m['dtype']}, "
        f"config sha256 {str(m['config_hash'])[:12]}]",
        f"tokenizer    {t.get('name')}  (vocab {t.get('vocab_size')}, bos {t.get('bos_token_id')}, "
        f"eos {t.get('eos_token_id')})",
        f"data         {d['spec']}  split={d['split']} field={d['text_field']}  fingerprint {str(d['fingerprint'])[:12]}",
        f"contexts     ctx_len {info['ctx_len']}, seed {info['seed']}; {info['bos_policy']}",
        f"storage      {st['dtype']} ({DTYPES[st['dtype']][0]} on disk), codec {st['codec']}, "
        f"shards of {st['shard_rows']} rows, inner chunks of {st['chunk_rows']} rows",
        "hooks        " + ", ".join(f"{k} (d={v['d']}, {v['module']}:{v['io']})" for k, v in info["hooks"].items()),
        f"rows         {info['rows']:,} of {info['rows_planned']:,}; shards {info['shards']['complete']}/"
        f"{info['shards']['total']} {'(complete)' if info['complete'] else '(INCOMPLETE: rerun the harvest)'}",
        f"size         {info['bytes_on_disk']:,} bytes; {info['bytes_per_value']:.3f} bytes per activation value",
        "written by   " + ", ".join(f"{w['host']} (saecache {w['package_version']})" for w in info["written_by"])
        + (f" between {info['written_between'][0]} and {info['written_between'][1]}" if info["written_between"] else ""),
        f"fingerprint  {info['fingerprint']}",
    ]
    return "\n".join(lines)


def verify_store(url: str, storage_options: dict | None = None) -> list[str]:
    """Every problem found, one line each (empty = healthy): missing shards, missing, resized or corrupt objects."""
    store = Store.open(url, storage_options)
    problems = []
    manifest = store.manifest()
    for s in range(store.geometry.n_shards):
        if s not in manifest:
            problems.append(f"shard {s}: missing (no manifest entry: never written or interrupted)")
            continue
        for key, want in sorted(manifest[s]["objects"].items()):
            data = store.loc.get(key)
            if data is None:
                problems.append(f"shard {s}: object {key} is missing")
                continue
            got = checksum(data)
            if got != want:
                problems.append(f"shard {s}: object {key} is corrupt (crc32c {got['crc32c']} != {want['crc32c']}, "
                                f"{got['nbytes']} vs {want['nbytes']} bytes)")
    for name in _Location(url, storage_options).list(MANIFEST_DIR):
        raw = store.loc.get(f"{MANIFEST_DIR}/{name}")
        if raw is not None and json.loads(raw)["shard"] >= store.geometry.n_shards:
            problems.append(f"manifest entry {name} names a shard beyond the store's {store.geometry.n_shards}")
    return problems
