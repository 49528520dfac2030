"""A job whose input, output and cache live on S3 or on Google Cloud Storage: real servers that
speak each store's API (moto's server mode for S3, gcp-storage-emulator for GCS's JSON API),
started here on a free port; s3fs / gcsfs for curate's own reads and writes, Beam's S3 / GCS
filesystems for its sinks; never a mocked client."""
import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import EXAMPLES, ids, load_manifest, run_cli, write_job

BUCKET = "curate-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(argv: list[str], log_path, make_bucket):
    """A store's server as a subprocess, up once ``make_bucket()`` succeeds (30 s at most)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    make_bucket()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.2)
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def s3(monkeypatch, tmp_path):
    pytest.importorskip("moto", reason="moto[server] is installed with the dev extras")
    pytest.importorskip("s3fs", reason="s3fs is installed with the dev extras")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    import boto3
    import s3fs

    with _server(["moto.server", "-H", "127.0.0.1", "-p", str(port)], tmp_path / "moto.log",
                 lambda: boto3.client("s3").create_bucket(Bucket=BUCKET)):
        s3fs.S3FileSystem.clear_instance_cache()
        yield s3fs.S3FileSystem(use_listings_cache=False)  # as curate's own: runs rewrite what it reads
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """A GCS JSON API server in memory; clients find it through ``STORAGE_EMULATOR_HOST`` (gcsfs and
    google-cloud-storage, which Beam's GCS filesystem uses, both read it) and connect anonymously."""
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is installed with the dev extras")
    gcsfs = pytest.importorskip("gcsfs", reason="gcsfs is installed with the dev extras")
    port = _free_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    from google.cloud import storage

    with _server(["gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                 tmp_path / "gcs.log", lambda: storage.Client().create_bucket(BUCKET)):
        gcsfs.GCSFileSystem.clear_instance_cache()
        yield gcsfs.GCSFileSystem(use_listings_cache=False)
        gcsfs.GCSFileSystem.clear_instance_cache()


def _job(folder, name, inputs, output, cache):
    cfg = {"name": name, "output": output, "seed": 0, "inputs": inputs,
           "dedup": {"exact": {"scope": "global"}, "semantic": {"enabled": False}},
           "embed": {"cache_dir": cache}, "cluster": {"enabled": True, "k": 4},
           "score": {"ifd": {"enabled": False}},
           "select": {"policy": "cluster_balanced", "params": {"score": "cluster_sim"}, "budget": {"fraction": 0.5}}}
    return write_job(folder, cfg, f"{name}.yaml")


def test_input_output_and_cache_on_s3_round_trip(job_dir, s3, capsys):
    rows = [json.loads(x) for x in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:24]
    rows += rows[:3]  # exact duplicates
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    with s3.open(f"{BUCKET}/in/part-0.jsonl.gz", "wb") as fh:
        fh.write(gzip.compress(lines[: len(lines) // 2].rsplit("\n", 1)[0].encode() + b"\n"))
    with s3.open(f"{BUCKET}/in/part-1.jsonl", "wb") as fh:
        fh.write(lines[len(lines[: len(lines) // 2].rsplit("\n", 1)[0]) + 1:].encode())
    (job_dir / "local.jsonl").write_text(lines)
    remote_in = [{"source": "gsm8k", "path": f"s3://{BUCKET}/in/part-*"}]
    out, cache = f"s3://{BUCKET}/runs/a", f"s3://{BUCKET}/cache/embed"

    assert run_cli("run", _job(job_dir, "s3", remote_in, out, cache)) == 0
    capsys.readouterr()
    # the same rows from a local file, with a local cache: the same selection
    assert run_cli("run", _job(job_dir, "local", [{"source": "gsm8k", "path": "local.jsonl"}], "local",
                               str(job_dir / "cache"))) == 0
    listing = s3.find(f"{BUCKET}/runs")
    assert f"{BUCKET}/runs/a/manifest.json" in listing and not any(".tmp-" in k for k in listing)
    with s3.open(f"{BUCKET}/runs/a/manifest.json") as fh:
        man = json.load(fh)
    assert man["accounting"]["holds"] and man["counts"]["rows_in"] == 27
    assert man["counts"]["dropped"]["exact_duplicate"] == 3
    assert {i["path"] for i in man["inputs"]} == {f"s3://{BUCKET}/in/part-0.jsonl.gz", f"s3://{BUCKET}/in/part-1.jsonl"}
    assert all(i["sha256"] is None and i["etag"] for i in man["inputs"])
    assert man["stages"]["embed"]["model_rows"] == 24 and s3.glob(f"{BUCKET}/cache/embed/*/*.parquet")
    remote_ids = sorted(pd.read_parquet(f"{BUCKET}/runs/a/selected", filesystem=s3).id)
    assert remote_ids == ids("local") and len(remote_ids) == 12
    # readers take the folder where it is
    assert run_cli("inspect", out) == 0 and "accounting holds" in capsys.readouterr().out
    assert run_cli("export", out, "--format", "alpaca-json", "--out", job_dir / "a.json") == 0
    assert len(json.load(open(job_dir / "a.json", encoding="utf-8"))) == 12

    assert run_cli("select", out, "--policy", "random", "--rows", "5") == 0  # written beside the run, on S3
    with s3.open(f"{BUCKET}/runs/a/selections/random/selection.json") as fh:
        assert json.load(fh)["selected"] == 5
    assert len(pd.read_parquet(f"{BUCKET}/runs/a/selections/random/selected", filesystem=s3)) == 5
    assert run_cli("export", out, "--format", "messages-jsonl") == 0
    assert len(s3.cat(f"{BUCKET}/runs/a/export/messages.jsonl").splitlines()) == 12
    capsys.readouterr()

    # a rerun over the output reads every embedding from the S3 cache
    assert run_cli("run", _job(job_dir, "s3", remote_in, out, cache), "--overwrite") == 0
    with s3.open(f"{BUCKET}/runs/a/manifest.json") as fh:
        again = json.load(fh)
    assert again["stages"]["embed"]["cached"] == 24 and "model_rows" not in again["stages"]["embed"]
    assert sorted(pd.read_parquet(f"{BUCKET}/runs/a/selected", filesystem=s3).id) == remote_ids
    assert run_cli("run", _job(job_dir, "s3", remote_in, out, cache)) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err

    # what a run that stopped before its last write leaves is refused
    s3.copy(f"{BUCKET}/runs/a/selected", f"{BUCKET}/runs/half/selected", recursive=True)
    for argv in (("inspect", f"s3://{BUCKET}/runs/half"),
                 ("export", f"s3://{BUCKET}/runs/half", "--format", "alpaca-json", "--out", job_dir / "h.json")):
        assert run_cli(*argv) == 2
        assert "no manifest.json (not a finished curate run)" in capsys.readouterr().err
    assert not os.path.exists(job_dir / "h.json")

    # targets (score.rds, score.less) are read from the store like inputs: globbed, decompressed
    with s3.open(f"{BUCKET}/targets/math.jsonl.gz", "wb") as fh:
        fh.write(gzip.compress(lines.encode()))
    from curate.config import validate
    from pipelines.targeted import read_targets

    job = validate({"output": "t", "inputs": remote_in, "score": {"ifd": {"enabled": False}, "rds": {"enabled": True}},
                    "targets": [{"source": "math", "path": f"s3://{BUCKET}/targets/*.jsonl.gz"}]})
    got = read_targets(job)
    assert len(got) == 27 and {r["source"] for r in got} == {"math"} and got[0]["prompt"] == rows[0]["instruction"]


def test_the_batch_path_writes_its_outputs_onto_s3_as_it_does_locally(job_dir, s3, caplog):
    """A job with no model stage runs on the batch path, whose last step writes its own Parquet
    files (``curate.storage.ParquetFile``): on a store, the same rows, schemas and file names."""
    import logging

    import pyarrow.parquet as pq

    from tests.conftest import without_models

    caplog.set_level(logging.INFO, logger="curate")
    rows = [json.loads(x) for x in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:30]
    (job_dir / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:4]))
    for name, out in (("remote", f"s3://{BUCKET}/runs/batch"), ("here", "here")):
        cfg = without_models({"name": name, "output": out, "inputs": [{"source": "g", "path": "in.jsonl"}],
                              "dedup": {"exact": {"enabled": True}, "near": {"enabled": True}},
                              "select": {"policy": "random", "budget": {"fraction": 0.5}}})
        assert run_cli("run", write_job(job_dir, cfg, f"{name}.yaml")) == 0
    assert "the batch path" in caplog.text
    for part in ("annotated", "selected"):
        remote = sorted(k.rsplit("/", 1)[1] for k in s3.find(f"{BUCKET}/runs/batch/{part}"))
        assert remote == sorted(os.listdir(job_dir / "here" / part)) == ["part-00000.parquet"]
        with s3.open(f"{BUCKET}/runs/batch/{part}/part-00000.parquet", "rb") as fh:
            there = pq.read_table(fh)
        assert there.equals(pq.read_table(job_dir / "here" / part / "part-00000.parquet"))
    assert there.num_rows == len(rows) // 2 and "list<item: " in str(there.schema.field("messages").type)


def test_input_output_and_cache_on_gcs_round_trip(job_dir, gcs, capsys):
    """The same storage layer on gs:// URLs: a globbed, partly gzipped input, the output committed
    without a rename (manifest last), the embeddings cache reused, a half-written folder refused."""
    rows = [json.loads(x) for x in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:12]
    rows += rows[:2]  # exact duplicates
    lines = [json.dumps(r) + "\n" for r in rows]
    with gcs.open(f"{BUCKET}/in/part-0.jsonl.gz", "wb") as fh:
        fh.write(gzip.compress("".join(lines[:7]).encode()))
    with gcs.open(f"{BUCKET}/in/part-1.jsonl", "wb") as fh:
        fh.write("".join(lines[7:]).encode())
    (job_dir / "local.jsonl").write_text("".join(lines))
    remote_in = [{"source": "gsm8k", "path": f"gs://{BUCKET}/in/part-*"}]
    out, cache = f"gs://{BUCKET}/runs/a", f"gs://{BUCKET}/cache/embed"

    assert run_cli("run", _job(job_dir, "gcs", remote_in, out, cache)) == 0
    assert run_cli("run", _job(job_dir, "local", [{"source": "gsm8k", "path": "local.jsonl"}], "local",
                               str(job_dir / "cache"))) == 0
    listing = gcs.find(f"{BUCKET}/runs")
    assert f"{BUCKET}/runs/a/manifest.json" in listing and not any(".tmp-" in k for k in listing)
    man = json.loads(gcs.cat(f"{BUCKET}/runs/a/manifest.json"))
    assert man["accounting"]["holds"] and man["counts"]["rows_in"] == 14
    assert man["counts"]["dropped"]["exact_duplicate"] == 2
    assert {i["path"] for i in man["inputs"]} == {f"gs://{BUCKET}/in/part-0.jsonl.gz", f"gs://{BUCKET}/in/part-1.jsonl"}
    assert man["stages"]["embed"]["model_rows"] == 12 and gcs.glob(f"{BUCKET}/cache/embed/*/*.parquet")
    remote_ids = sorted(pd.read_parquet(f"{BUCKET}/runs/a/selected", filesystem=gcs).id)
    assert remote_ids == ids("local") and len(remote_ids) == 6
    capsys.readouterr()
    assert run_cli("inspect", out) == 0 and "accounting holds" in capsys.readouterr().out

    assert run_cli("run", _job(job_dir, "gcs", remote_in, out, cache), "--overwrite") == 0
    again = json.loads(gcs.cat(f"{BUCKET}/runs/a/manifest.json"))
    assert again["stages"]["embed"]["cached"] == 12 and "model_rows" not in again["stages"]["embed"]
    assert sorted(pd.read_parquet(f"{BUCKET}/runs/a/selected", filesystem=gcs).id) == remote_ids

    gcs.copy(f"{BUCKET}/runs/a/selected", f"{BUCKET}/runs/half/selected", recursive=True)
    capsys.readouterr()
    assert run_cli("inspect", f"gs://{BUCKET}/runs/half") == 2
    assert "no manifest.json (not a finished curate run)" in capsys.readouterr().err


def test_folders_copy_to_and_from_a_store_with_the_marker_last(tmp_path, s3, monkeypatch):
    from curate import storage

    url = f"s3://{BUCKET}/f/w"
    fs = storage._fs(url)[0]  # fsspec hands every caller with these options this one instance
    order, put_file = [], fs.put_file

    def recording(lpath, rpath, *args, **kwargs):
        order.append(rpath.rsplit("/w/", 1)[1])
        return put_file(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", recording)

    local = tmp_path / "w"
    (local / "ckpt-1").mkdir(parents=True)
    (local / "ckpt-1" / "adapter.safetensors").write_bytes(b"\x00weights")
    (local / "warmup.json").write_text("{}")
    (local / "a.json").write_text("[1]")
    storage.upload_folder(str(local), url, last="warmup.json")
    assert sorted(s3.find(f"{BUCKET}/f/w")) == [f"{BUCKET}/f/w/{n}" for n in ("a.json", "ckpt-1/adapter.safetensors",
                                                                           "warmup.json")]
    assert order[-1] == "warmup.json" and len(order) == 3  # a reader that waits for it sees the rest
    copy = tmp_path / "copy"
    storage.download_folder(url, str(copy))
    assert (copy / "ckpt-1" / "adapter.safetensors").read_bytes() == b"\x00weights"
    assert sorted(os.listdir(copy)) == ["a.json", "ckpt-1", "warmup.json"]
    assert not [p for p in os.listdir(tmp_path) if ".part-" in p]
    (copy / "a.json").write_text("mine")
    storage.download_folder(url, str(copy))  # a copy already there is kept, never half-replaced
    assert (copy / "a.json").read_text() == "mine"
    # another process finishes the same copy while this one downloads: its copy stays, no .part- left
    late = tmp_path / "late"
    get_file = fs.get_file

    def racing(rpath, lpath, *args, **kwargs):
        late.mkdir(exist_ok=True)
        (late / "theirs").write_text("x")
        return get_file(rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(fs, "get_file", racing)
    storage.download_folder(url, str(late))
    assert os.listdir(late) == ["theirs"] and not [p for p in os.listdir(tmp_path) if ".part-" in p]
    monkeypatch.setattr(fs, "get_file", get_file)
    with pytest.raises(FileNotFoundError, match="nothing there"):
        storage.download_folder(f"s3://{BUCKET}/f/none", str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


def test_less_warm_up_and_feature_stores_on_s3(job_dir, s3, fresh_caches):
    """``score.less.cache_dir`` on a store: the warm-up is trained once and copied there (its
    ``warmup.json`` last), the features go there as shards; a machine without the warm-up copies
    it from the store and takes every feature from it, with the same scores."""
    from tests.test_less import _job as less_job

    cache = f"s3://{BUCKET}/cache/less"
    assert run_cli("run", less_job(job_dir, "first", cache)) == 0
    first = load_manifest("first")["less"]
    warmup = f"{cache}/warmup/{first['warmup_key']}"
    assert first["warmup_how"] == "trained" and first["warmup"] == first["warmup_store"] == warmup
    stored = s3.find(warmup[len("s3://"):])
    assert any(k.endswith("/warmup.json") for k in stored) and len(first["checkpoints"]) == 2
    assert all(any(k.endswith(f"/{os.path.basename(c)}/adapter.safetensors") for k in stored)
               for c in first["checkpoints"])
    assert first["model_rows"] == 9 and first["cache_pool"].startswith(f"{cache}/features/")
    assert s3.glob(f"{first['cache_pool'][len('s3://'):]}/*.parquet")

    shutil.rmtree(os.path.join(fresh_caches, "less", "store-copies"))  # another machine: no local copy
    assert run_cli("run", less_job(job_dir, "second", cache)) == 0
    second = load_manifest("second")["less"]
    assert second["warmup_how"] == "cached" and second["warmup_key"] == first["warmup_key"]
    assert second["cached_rows"] == 9 and not second.get("model_rows")
    a = pd.read_parquet("first/annotated").set_index("id").sort_index()
    b = pd.read_parquet("second/annotated").set_index("id").sort_index()
    assert a.less_score.equals(b.less_score) and a.less_score.notna().sum() >= 6
    assert ids("first") == ids("second")

    # the store lost the warm-up (an upload cut short): the local copy is reused and uploaded again
    s3.rm(warmup[len("s3://"):], recursive=True)
    assert run_cli("run", less_job(job_dir, "third", cache)) == 0
    third = load_manifest("third")["less"]
    assert third["warmup_how"] == "cached" and not third.get("model_rows")
    assert s3.find(warmup[len("s3://"):]) == stored
