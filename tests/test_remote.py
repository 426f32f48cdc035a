"""Stores on object storage, against a real S3-API server on loopback: moto in server mode, in a subprocess started
and stopped by the `s3` fixture, with IAM authorization switched on (a `writer` user with s3:*, a `reader` user with
only s3:GetObject/ListBucket). Nothing leaves 127.0.0.1.

Note on the server: moto 5.2 checks SigV4 signatures of S3 requests with the query string as werkzeug decodes it
(`prefix=x/` instead of `prefix=x%2F`), so any listing with a prefix fails with SignatureDoesNotMatch although the
client is right. The launcher below re-encodes the query before moto checks the signature; nothing else is changed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from _store import TINY_STORE_HOOKS, tiny_harvest_config, tiny_store_in
from saecache.cli import main

BUCKET = "team-bucket"

MOTO_LAUNCHER = r"""
import sys
from urllib.parse import parse_qsl, quote, urlsplit
from moto.iam import access_control as ac
_orig = ac.IAMRequestBase._create_aws_request
def _create(self):
    parts = urlsplit(self._path)
    if parts.query:
        q = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
        self._path = parts.path + "?" + q
    return _orig(self)
ac.IAMRequestBase._create_aws_request = _create
from moto.server import main
main(sys.argv[1:])
"""


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


BASE_ENV = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A loopback S3 server with a bucket and two IAM users; yields {endpoint, writer: (key, secret), reader: …}."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"  # werkzeug logs one line per request
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-c", MOTO_LAUNCHER, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        import boto3

        admin = dict(endpoint_url=endpoint, aws_access_key_id="admin", aws_secret_access_key="admin",
                     region_name="us-east-1")
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        users = {}
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName="store", PolicyDocument=json.dumps(policy))
            k = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = (k["AccessKeyId"], k["SecretAccessKey"])
        # from here on every request needs valid credentials and is checked against the users' policies
        req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req)
        yield {"endpoint": endpoint, "log": log_path, **users}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _clear_fs_caches():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached by arguments, not by the environment


def use_identity(monkeypatch, s3, who: str | None, cache_dir: Path, endpoint: str | None = None) -> dict:
    """Point the process (and its subprocesses) at the server as `who` (writer, reader, None = no credentials)."""
    env = {**BASE_ENV, "AWS_ENDPOINT_URL": endpoint or s3["endpoint"], "SAECACHE_CACHE_DIR": str(cache_dir)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if who is None:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3[who][0])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3[who][1])
    _clear_fs_caches()
    return env


def boto(s3, who="writer"):
    import boto3

    return boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=s3[who][0],
                        aws_secret_access_key=s3[who][1], region_name="us-east-1")


def run_cli(args, capsys):
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err) -> str:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a local store; manifest entries without their `writer` (host, pid, time of the harvest). The
    harvest plan (`_plan/`) is left out: only harvesting workers read it, and a copy does not carry it."""
    out = {}
    for p in root.rglob("*"):
        key = str(p.relative_to(root))
        if p.is_file() and not key.startswith(("_claims", "_plan")):
            out[key] = p.read_bytes()
            if key.startswith("_manifest/shard-"):
                entry = json.loads(out[key])["attributes"]["saecache"]
                out[key] = {k: v for k, v in entry.items() if k != "writer"}
    return out


@pytest.fixture(scope="module")
def s3_store(s3, tiny_model_dir, tiny_corpus, tmp_path_factory):
    """The tiny store harvested straight into the bucket by the writer (same config as `tiny_store`), by two
    workers at the same time: `--worker 1/2` in another process (`saecache harvest`) and `0/2` in this one."""
    return _harvest_to_s3(s3, tiny_model_dir, tiny_corpus, tmp_path_factory, "float16")


@pytest.fixture(scope="module")
def s3_store_int8(s3, tiny_model_dir, tiny_corpus, tmp_path_factory):
    """`s3_store` in the quantized int8 format (same config as `tiny_store_int8`)."""
    return _harvest_to_s3(s3, tiny_model_dir, tiny_corpus, tmp_path_factory, "int8")


def _harvest_to_s3(s3, tiny_model_dir, tiny_corpus, tmp_path_factory, dtype: str) -> str:
    from saecache.harvest.run import run_harvest

    mp = pytest.MonkeyPatch()
    url = f"s3://{BUCKET}/stores/tiny.zarr" if dtype == "float16" else f"s3://{BUCKET}/stores/tiny-{dtype}.zarr"
    try:
        use_identity(mp, s3, "writer", tmp_path_factory.mktemp("cache"))
        cfg = tiny_harvest_config(url, tiny_model_dir, tiny_corpus, dtype=dtype)
        args = ["--out", url, "--model", cfg.model, "--dataset", cfg.dataset, "--hooks", ",".join(cfg.hooks),
                "--ctx-len", cfg.ctx_len, "--tokens", cfg.tokens, "--batch-size", cfg.batch_size, "--ctx-per-chunk",
                cfg.ctx_per_chunk, "--chunks-per-shard", cfg.chunks_per_shard, "--device", "cpu", "--dtype", dtype,
                "--quiet"]
        other = subprocess.Popen([sys.executable, "-m", "saecache", "harvest", *map(str, args), "--worker", "1/2"],
                                 env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            mine = run_harvest(tiny_harvest_config(url, tiny_model_dir, tiny_corpus, worker="0/2", dtype=dtype),
                               progress=False)
        finally:
            _, err = other.communicate(timeout=300)
        assert other.returncode == 0, err.decode()
        assert mine["shards_written"] == 8
    finally:
        mp.undo()
        _clear_fs_caches()
    return url


@pytest.mark.parametrize("fmt", ["float16", "int8"])
def test_harvest_to_s3_and_copy_out_and_back_equal_local(s3, request, fmt, tmp_path, monkeypatch, capsys):
    from saecache.harvest.store import Store

    s3_store = request.getfixturevalue({"float16": "s3_store", "int8": "s3_store_int8"}[fmt])
    tiny_store = tiny_store_in(request, fmt)
    use_identity(monkeypatch, s3, "writer", tmp_path / "cache")
    local = Store.open(str(tiny_store))
    remote = Store.open(s3_store)
    assert remote.is_complete and remote.final is not None
    assert remote.fingerprint() == local.fingerprint()
    for h in TINY_STORE_HOOKS:
        np.testing.assert_array_equal(remote.read_acts(h, 0, remote.geometry.n_rows),
                                      local.read_acts(h, 0, local.geometry.n_rows))
    # pull to local disk: byte-identical to the locally harvested store (but for who wrote it when)
    pulled = tmp_path / "pulled.zarr"
    code, out, err = run_cli(["copy", s3_store, pulled, "--quiet"], capsys)
    assert code == 0, err
    assert f"copied {local.geometry.n_shards} shard(s)" in out
    assert store_files(pulled) == store_files(Path(tiny_store))
    # push back under another prefix: same fingerprint, verify passes on the server
    back = f"s3://{BUCKET}/stores/back-{fmt}.zarr"
    code, out, err = run_cli(["copy", pulled, back, "--quiet", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["fingerprint"] == local.fingerprint()
    code, out, err = run_cli(["verify", back], capsys)
    assert code == 0 and f"all {local.geometry.n_shards} shards verified" in out, out + err


def _train(store_url: str, out: Path):
    from saecache.train.config import SAESpec, TrainConfig
    from saecache.train.trainer import run_training

    cfg = TrainConfig(stores=[store_url], out=str(out), steps=24, batch_size=64, warmup_steps=4, heldout_fraction=0.25,
                      checkpoint_every=1000, progress=False, device="cpu",
                      saes=[SAESpec(arch="topk", width=32, hook_in="mlp_out.0", k=4, name="topk0")])
    return run_training(cfg)[0]


def _evaluate(store_url: str, run_dir: str, out: Path) -> dict:
    from saecache.evaluate.config import EvalConfig
    from saecache.evaluate.runner import run_evaluation

    rows = run_evaluation(EvalConfig(run_dirs=[run_dir], store=store_url, out=str(out), n_contexts=8, device="cpu",
                                     histograms=False, html_features=0, threads=1))
    return {k: v for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_read_only_client_trains_and_evaluates_like_local(s3, s3_store, tiny_store, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from saecache.harvest.store import Store

    local_run = _train(str(tiny_store), tmp_path / "local")
    local_eval = _evaluate(str(tiny_store), local_run, tmp_path / "eval-local")

    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    with pytest.raises(PermissionError):  # the reader really cannot write
        import s3fs

        s3fs.S3FileSystem().pipe_file(f"{BUCKET}/stores/tiny.zarr/intruder", b"x")
    log_start = s3["log"].stat().st_size
    for cmd in (["info", s3_store], ["verify", s3_store]):
        code, out, err = run_cli(cmd, capsys)
        assert code == 0, err
    remote_run = _train(s3_store, tmp_path / "remote")
    a, b = load_file(f"{local_run}/sae.safetensors"), load_file(f"{remote_run}/sae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    remote_eval = _evaluate(s3_store, remote_run, tmp_path / "eval-remote")
    assert remote_eval == local_eval and len(remote_eval) > 5
    time.sleep(0.5)  # let the server flush its request log
    requests = s3["log"].read_bytes()[log_start:].decode(errors="replace").splitlines()
    methods = {ln.split('"')[1].split()[0] for ln in requests if ln.count('"') >= 2 and "HTTP/1.1" in ln}
    assert "GET" in methods and not methods - {"GET", "HEAD"}, methods  # not a single write attempt
    # the run dir names the store by URL and fingerprint, and holds no credentials
    cfg = json.loads(Path(remote_run, "cfg.json").read_text())
    assert cfg["stores"][0]["url"] == s3_store
    assert cfg["stores"][0]["fingerprint"] == Store.open(str(tiny_store)).fingerprint()
    for p in list(Path(remote_run).rglob("*")) + list((tmp_path / "eval-remote").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            assert s3["reader"][0].encode() not in data and s3["reader"][1].encode() not in data, p


def test_read_only_client_cannot_write(s3, s3_store, tiny_store, tmp_path, monkeypatch, capsys):
    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    dst = f"s3://{BUCKET}/stores/by-reader.zarr"
    line = one_line_error(*run_cli(["copy", tiny_store, dst, "--quiet"], capsys)[::2])
    assert "permission denied" in line
    line = one_line_error(*run_cli(["harvest", "--out", f"s3://{BUCKET}/stores/h.zarr", "--model", "/nonexistent",
                                    "--quiet"], capsys)[::2])
    assert "permission denied" in line  # refused before the model is even looked for
    assert "Contents" not in boto(s3).list_objects_v2(Bucket=BUCKET, Prefix="stores/by-reader.zarr")


def _upload_copy(s3, tiny_store, name: str, capsys) -> str:
    url = f"s3://{BUCKET}/stores/{name}"
    code, _, err = run_cli(["copy", tiny_store, url, "--quiet"], capsys)
    assert code == 0, err
    return url


def test_corrupt_or_missing_chunk_caught_by_verify_and_loader(s3, tiny_store, tmp_path, monkeypatch, capsys):
    from saecache.errors import StoreError
    from saecache.harvest.store import Store
    from saecache.harvest.split import Split
    from saecache.train.loader import Loader

    use_identity(monkeypatch, s3, "writer", tmp_path / "cache")
    url = _upload_copy(s3, tiny_store, "damaged.zarr", capsys)
    c = boto(s3)
    key = "stores/damaged.zarr/acts/mlp_out.0/c/3/0"
    body = bytearray(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # same size, one flipped byte
    c.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    c.delete_object(Bucket=BUCKET, Key="stores/damaged.zarr/acts/mlp_out.0/c/15/0")

    code, out, err = run_cli(["verify", url], capsys)
    assert code == 1
    assert "shard 3: object acts/mlp_out.0/c/3/0 is corrupt" in out
    assert "shard 15: object acts/mlp_out.0/c/15/0 is missing" in out

    use_identity(monkeypatch, s3, "reader", tmp_path / "cache2")
    for direct in (True, False):  # the loader's cached shard reader and its zarr path
        loader = Loader([Store.open(url)], ["mlp_out.0"], batch_size=64, partitions=1, direct=direct,
                        reader_threads=0)
        with pytest.raises(StoreError) as e:
            for _ in range(loader.batches_per_epoch(0)):
                next(loader)
        assert "does not match its manifest checksum" in str(e.value) or "missing from the store" in str(e.value)
    with pytest.raises(StoreError, match="listed in the manifest but missing"):  # evaluation's read path
        list(Split(0.1).heldout_batches(Store.open(url, cache=None), ["mlp_out.0"]))
    # each damage on its own, through the cached chunk reader and through zarr reads
    store = Store.open(url)
    r3, r15 = store.geometry.shard_row_range(3)[0], store.geometry.shard_row_range(15)[0]
    with pytest.raises(StoreError, match="c/3/0 of s3://team-bucket/stores/damaged.zarr does not match its manifest"):
        store.chunk_reader("mlp_out.0").read_rows(r3, 128)
    with pytest.raises(StoreError, match="c/15/0 of s3://team-bucket/stores/damaged.zarr is listed in the manifest"):
        store.chunk_reader("mlp_out.0").read_rows(r15, 128)
    with pytest.raises(StoreError, match="does not match its manifest checksum"):
        store.read_acts("mlp_out.0", r3, r3 + 10)
    with pytest.raises(StoreError, match="listed in the manifest but missing"):
        Store.open(url, cache=None).read_acts("mlp_out.0", r15, r15 + 10)
    np.testing.assert_array_equal(store.read_acts("mlp_out.0", 0, 512),  # undamaged shards read fine
                                  Store.open(str(tiny_store)).read_acts("mlp_out.0", 0, 512))
    line = one_line_error(*run_cli(["train", "--store", url, "--out", tmp_path / "runs", "--hook", "mlp_out.0",
                                    "--width", "32", "--k", "4", "--steps", "20", "--batch-size", "512",
                                    "--heldout", "0", "--partitions", "1", "--device", "cpu", "--no-progress"],
                                   capsys)[::2])
    assert "damaged.zarr" in line and ("checksum" in line or "missing" in line)


def test_cache_is_bounded_and_serves_second_epoch_locally(s3, s3_store, tiny_store, tmp_path, monkeypatch):
    from saecache.harvest.store.cache import CacheConfig, ShardCache
    from saecache.harvest.store import Store
    from saecache.train.loader import Loader

    use_identity(monkeypatch, s3, "reader", tmp_path / "unused")
    probe = Store.open(s3_store, cache=None)
    obj = probe.manifest()[0]["objects"]["acts/mlp_out.0/c/0/0"]["nbytes"]
    epoch = []
    for bound in (10**9, 3 * obj):  # roomy, and tighter than one epoch's 16 shard objects
        cache = ShardCache(CacheConfig(str(tmp_path / f"cache-{bound}"), bound))
        loader = Loader([Store.open(s3_store, cache=cache)], ["mlp_out.0"], batch_size=64, partitions=2,
                        reader_threads=2)
        n = loader.batches_per_epoch(0)
        first = [next(loader)["mlp_out.0"] for _ in range(n)]
        fetched = cache.bytes_fetched
        second = [next(loader)["mlp_out.0"] for _ in range(n)]
        loader.close()
        disk = sum(p.stat().st_size for p in Path(cache.cfg.dir).rglob("*") if p.is_file())
        assert disk <= bound + obj
        if bound == 10**9:
            assert cache.bytes_fetched == fetched  # second epoch: nothing downloaded again
            assert cache.hits > 0
        epoch.append((first, second))
    (a1, a2), (b1, b2) = epoch
    assert all(torch.equal(x, y) for x, y in zip(a1 + a2, b1 + b2))  # eviction does not change the batches
    ref = Loader([Store.open(str(tiny_store))], ["mlp_out.0"], batch_size=64, partitions=2, reader_threads=2)
    assert all(torch.equal(next(ref)["mlp_out.0"], x) for x in a1 + a2)  # = the same store on local disk


def test_two_workers_harvest_into_one_s3_store(s3, s3_store, tiny_store, tmp_path, monkeypatch):
    from saecache.harvest.store import Store

    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    store = Store.open(s3_store)
    assert store.is_complete and store.final is not None
    assert store.fingerprint() == Store.open(str(tiny_store)).fingerprint()  # = one local worker
    assert {e["writer"]["worker"] for e in store.manifest().values()} == {"0/2", "1/2"}
    assert not [n for n in store.loc.list("_claims") if n.startswith("worker-")]  # both released their claims


def test_copy_resumes_after_kill_and_repairs_damage(s3, tiny_store, tmp_path, monkeypatch, capsys):
    from saecache.harvest.store import Store

    use_identity(monkeypatch, s3, "writer", tmp_path / "cache")
    env = dict(os.environ)
    url = f"s3://{BUCKET}/stores/resumed.zarr"
    want = Store.open(str(tiny_store)).fingerprint()
    p = subprocess.Popen([sys.executable, "-m", "saecache", "copy", str(tiny_store), url, "--quiet", "--threads", "1"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    c = boto(s3)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        listed = c.list_objects_v2(Bucket=BUCKET, Prefix="stores/resumed.zarr/_manifest/shard-").get("KeyCount", 0)
        if listed >= 2:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = c.list_objects_v2(Bucket=BUCKET, Prefix="stores/resumed.zarr/_manifest/shard-").get("KeyCount", 0)
    assert 0 < done < 16, "the copy was not interrupted midway"
    assert "Contents" not in c.list_objects_v2(Bucket=BUCKET, Prefix="stores/resumed.zarr/_final/")

    code, out, err = run_cli(["copy", tiny_store, url, "--quiet", "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["shards_skipped"] >= done - 1 and s["shards_copied"] == 16 - s["shards_skipped"]
    assert s["fingerprint"] == want and s["complete"]

    # damage the destination: an object corrupted in place (same size) and a shard unpublished
    key = "stores/resumed.zarr/rows/token/c/5"
    body = bytearray(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-10] ^= 0x55
    c.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    c.delete_object(Bucket=BUCKET, Key="stores/resumed.zarr/_manifest/shard-000009/zarr.json")
    code, out, err = run_cli(["copy", tiny_store, url, "--quiet", "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["shards_repaired"] == [5] and s["shards_skipped"] == 15
    code, out, err = run_cli(["verify", url], capsys)
    assert code == 0, out


def test_hook_subset_copy_is_a_derived_store(s3, s3_store, tiny_store, tmp_path, monkeypatch, capsys):
    from saecache.harvest.store import Store

    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    dst = tmp_path / "subset.zarr"
    code, out, err = run_cli(["copy", s3_store, dst, "--hooks", "mlp_out.1", "--quiet"], capsys)
    assert code == 0, err
    sub, full = Store.open(str(dst)), Store.open(str(tiny_store))
    assert list(sub.hooks) == ["mlp_out.1"] and sub.is_complete
    np.testing.assert_array_equal(sub.read_acts("mlp_out.1", 0, 8192), full.read_acts("mlp_out.1", 0, 8192))
    assert sub.fingerprint() != full.fingerprint() and sub.final["fingerprint"] == sub.fingerprint()
    np.testing.assert_allclose(sub.stats("mlp_out.1")["mean"], full.stats("mlp_out.1")["mean"])
    assert not (dst / "acts" / "mlp_out.0").exists()
    code, out, err = run_cli(["info", dst], capsys)
    assert code == 0 and "derived from s3://team-bucket/stores/tiny.zarr" in out
    code, out, err = run_cli(["verify", dst], capsys)
    assert code == 0, out


def test_info_shows_provenance_and_fingerprint_tracks_content(s3, s3_store, tiny_store, tmp_path, monkeypatch, capsys):
    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    code, out, err = run_cli(["info", s3_store], capsys)
    assert code == 0, err
    header = json.loads((Path(tiny_store) / "zarr.json").read_text())["attributes"]["saecache"]
    for needle in (s3_store, header["model"]["name"], header["tokenizer"]["name"], header["dataset"]["spec"],
                   "ctx_len 32", "seed 0", "mlp_in.0 (d=", "mlp_out.1 (d=", "blosc-zstd", "8,192 of 8,192",
                   "(complete)", socket.gethostname(), "saecache 0.", "as worker(s) 0/2, 1/2",
                   "matches the final record"):
        assert needle in out, needle
    fp = json.loads(run_cli(["info", s3_store, "--json"], capsys)[1])["fingerprint"]
    assert len(fp) == 64

    # change content: one manifest entry edited (as a partial re-harvest would) -> new fingerprint, verify complains
    use_identity(monkeypatch, s3, "writer", tmp_path / "cache")
    url = _upload_copy(s3, tiny_store, "edited.zarr", capsys)
    assert json.loads(run_cli(["info", url, "--json"], capsys)[1])["fingerprint"] == fp
    c = boto(s3)
    key = "stores/edited.zarr/_manifest/shard-000002/zarr.json"
    node = json.loads(c.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    node["attributes"]["saecache"]["objects"]["rows/position/c/2"]["crc32c"] ^= 1
    c.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(node).encode())
    info = json.loads(run_cli(["info", url, "--json"], capsys)[1])
    assert info["fingerprint"] != fp and info["final_fingerprint_matches"] is False
    code, out, _ = run_cli(["verify", url], capsys)
    assert code == 1 and "shard 2: object rows/position/c/2 is corrupt" in out and "_final/zarr.json records" in out


def test_one_line_errors(s3, s3_store, tmp_path, monkeypatch, capsys):
    # unreachable endpoint (AWS_MAX_ATTEMPTS=1: botocore's retries would only make the test slow)
    use_identity(monkeypatch, s3, "reader", tmp_path / "cache", endpoint=f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    line = one_line_error(*run_cli(["info", s3_store], capsys)[::2])
    assert "cannot reach the storage endpoint" in line
    # no credentials at all
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    use_identity(monkeypatch, s3, None, tmp_path / "cache")
    line = one_line_error(*run_cli(["info", s3_store], capsys)[::2])
    assert "no credentials" in line
    # credentials the server does not know
    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    _clear_fs_caches()
    line = one_line_error(*run_cli(["verify", s3_store], capsys)[::2])
    assert "permission denied" in line and "wrong" not in line
    # a store from a newer format
    use_identity(monkeypatch, s3, "writer", tmp_path / "cache")
    c = boto(s3)
    meta = json.loads(c.get_object(Bucket=BUCKET, Key="stores/tiny.zarr/zarr.json")["Body"].read())
    meta["attributes"]["saecache"]["format_version"] = 99
    c.put_object(Bucket=BUCKET, Key="stores/future.zarr/zarr.json", Body=json.dumps(meta).encode())
    use_identity(monkeypatch, s3, "reader", tmp_path / "cache")
    line = one_line_error(*run_cli(["info", f"s3://{BUCKET}/stores/future.zarr"], capsys)[::2])
    assert "format version 99" in line and "upgrade saecache" in line
    # nothing there
    line = one_line_error(*run_cli(["verify", f"s3://{BUCKET}/stores/nothing.zarr"], capsys)[::2])
    assert "no store at s3://team-bucket/stores/nothing.zarr" in line


def test_missing_backend_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if gcsfs were not installed: `import gcsfs` fails
    line = one_line_error(*run_cli(["info", "gs://some-bucket/store.zarr"], capsys)[::2])
    assert "needs the gcsfs package" in line and "pip install gcsfs" in line


def test_copy_refuses_a_foreign_destination(tiny_store, tmp_path, capsys):
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "cat.jpg").write_bytes(b"meow")
    line = one_line_error(*run_cli(["copy", tiny_store, dst, "--quiet"], capsys)[::2])
    assert "not empty and not a store" in line
    assert sorted(p.name for p in dst.iterdir()) == ["cat.jpg"]  # nothing written
    other = tmp_path / "other.zarr"
    assert run_cli(["copy", tiny_store, other, "--quiet", "--hooks", "mlp_out.0"], capsys)[0] == 0
    line = one_line_error(*run_cli(["copy", tiny_store, other, "--quiet"], capsys)[::2])  # full copy onto a subset
    assert "already holds a different store" in line


def test_local_store_object_missing_despite_manifest_is_an_error_not_zeros(tiny_store, tmp_path, capsys):
    import shutil

    from saecache.errors import StoreError
    from saecache.harvest.store import Store

    dst = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, dst)
    (dst / "acts" / "mlp_out.1" / "c" / "4" / "0").unlink()
    store = Store.open(str(dst))
    r0 = store.geometry.shard_row_range(4)[0]
    with pytest.raises(StoreError, match="acts/mlp_out.1/c/4/0 of .* is listed in the manifest but missing"):
        store.read_acts("mlp_out.1", r0, r0 + 5)
    assert store.read_acts("mlp_out.1", 0, 5).any()  # other shards unaffected
    code, out, _ = run_cli(["verify", dst], capsys)
    assert code == 1 and "shard 4: object acts/mlp_out.1/c/4/0 is missing" in out


def test_cache_survives_restarts_and_rechecks_files_on_disk(s3, s3_store, tiny_store, tmp_path, monkeypatch):
    from saecache.harvest.store.cache import CacheConfig, ShardCache
    from saecache.harvest.store import Store

    use_identity(monkeypatch, s3, "reader", tmp_path / "unused")
    cfg = CacheConfig(str(tmp_path / "cache"), 10**9)
    want = Store.open(str(tiny_store)).read_acts("mlp_out.1", 0, 8192)

    def read_all(cache):
        arr = Store.open(s3_store, cache=cache).chunk_reader("mlp_out.1")
        return np.concatenate([arr.read_rows(r, 128) for r in range(0, 8192, 128)])

    first = ShardCache(cfg)
    np.testing.assert_array_equal(read_all(first), want)
    assert first.misses == 16 and first.bytes_fetched > 0
    again = ShardCache(cfg)  # a new process: files on disk are reused after a checksum check
    np.testing.assert_array_equal(read_all(again), want)
    assert again.bytes_fetched == 0
    victim = next(Path(cfg.dir).rglob("*/acts/mlp_out.1/c/7/0.*"))
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01  # bit rot in the local cache
    victim.write_bytes(bytes(data))
    healed = ShardCache(cfg)
    np.testing.assert_array_equal(read_all(healed), want)
    assert healed.misses == 1 and healed.bytes_fetched == len(data)  # only the damaged object fetched again


def test_any_fsspec_url_memory_filesystem(tiny_store, tmp_path, monkeypatch, capsys):
    """A backend without async support (fsspec's in-memory filesystem) goes through the same code."""
    from saecache.harvest.store import Store

    monkeypatch.setenv("SAECACHE_CACHE_DIR", str(tmp_path / "cache"))
    url = "memory://team/tiny.zarr"
    assert run_cli(["copy", tiny_store, url, "--quiet"], capsys)[0] == 0
    local, remote = Store.open(str(tiny_store)), Store.open(url)
    assert remote.fingerprint() == local.fingerprint()
    np.testing.assert_array_equal(remote.read_acts("mlp_in.0", 0, 8192), local.read_acts("mlp_in.0", 0, 8192))
    np.testing.assert_array_equal(remote.chunk_reader("mlp_in.0").read_rows(640, 128),
                                  local.read_acts("mlp_in.0", 640, 768))
    assert run_cli(["verify", url], capsys)[0] == 0


def test_copy_of_a_store_still_being_harvested_catches_up_later(tmp_path, monkeypatch, capsys):
    """Copy publishes only the source's finished shards; a later run adds the rest and the final record."""
    from test_store import make_header, write_all

    from saecache.harvest.store import Store

    monkeypatch.setenv("SAECACHE_CACHE_DIR", str(tmp_path / "cache"))
    src, dst = str(tmp_path / "src.zarr"), "memory://team/growing.zarr"
    header = make_header(n_contexts=20)  # 5 shards
    write_all(src, header, shards={0, 1, 3})
    code, out, err = run_cli(["copy", src, dst, "--quiet", "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert (s["shards"], s["shards_total"], s["complete"]) == (3, 5, False)
    partial = Store.open(dst)
    assert partial.complete_shards() == [0, 1, 3] and partial.final is None
    write_all(src, header)  # the harvest finishes (rewrites identical shards 0, 1, 3; adds 2 and 4)
    s = json.loads(run_cli(["copy", src, dst, "--quiet", "--json"], capsys)[1])
    assert (s["shards_skipped"], s["shards_copied"], s["complete"]) == (3, 2, True)
    assert Store.open(dst).fingerprint() == Store.open(src).fingerprint() == Store.open(dst).final["fingerprint"]
