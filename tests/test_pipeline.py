"""End-to-end runs of the Beam job on the real local runner, real Parquet, real data."""
import json
import os
import random

import pandas as pd
import pyarrow.parquet as pq
import pytest

from curate import schema
from tests.conftest import without_models, EXAMPLES, REPO, ids, load_manifest, read_table, run_cli, shared, write_job

# the tests share one run of both sources (a module fixture): one xdist worker runs them all
pytestmark = pytest.mark.xdist_group("pipeline")

DEMO_INPUTS = [
    {"source": "alpaca_cherry", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
    {"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"},
    {"source": "nq", "path": f"{EXAMPLES}/nq_sharegpt_sample.json", "form": "sharegpt",
     "id_field": "id", "fields": {"conversations": "items"}},
]


def _accounted_from_files(out) -> dict:
    """Recount the outcome from the Parquet files themselves, not from the manifest."""
    ann = read_table(out, "annotated").to_pandas()
    rej = read_table(out, "rejects").to_pandas()
    return {"selected": int(ann.selected.sum()),
            "dropped": ann[~ann.selected].drop_reason.value_counts().to_dict(),
            "rejected": rej.reason.value_counts().to_dict()}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    out = folder / "out"
    # every row of both files; the model stages run on a sample in the next test (CPU embedding of
    # ~130-token rows is ~40 rows/s, too slow for 10,584 rows in the suite)
    job = write_job(folder, without_models({"output": str(out), "inputs": TWO_SOURCES}))
    assert run_cli("run", job) == 0
    return out


TWO_SOURCES = [{"source": "alpaca_cherry", "path": shared("alpaca_cherry_5pct.json")},
               {"source": "gsm8k", "path": shared("gsm8k_train.json")}]


def test_two_source_sample_runs_every_stage(job_dir):
    job = write_job(job_dir, {"output": "out", "inputs": TWO_SOURCES, "sample": {"mode": "random", "n": 8},
                              "score": {"ifd": {"cache": False, "max_length": 128}}})
    assert run_cli("run", job) == 0
    man = load_manifest("out")
    assert man["accounting"]["holds"] and man["counts"]["rows_in"] == 16
    assert {"read", "validate", "ids", "exact_dedup", "near_dedup", "embed", "cluster", "semantic_dedup",
            "write"} <= set(man["stages"])
    embedded = 16 - sum(man["counts"]["dropped"].get(r, 0) for r in ("exact_duplicate", "near_duplicate"))
    assert man["stages"]["embed"]["rows"] == man["stages"]["cluster"]["rows"] == embedded
    ann = read_table("out", "annotated").to_pandas()
    assert ann[ann.selected].cluster_id.notna().all() and man["cluster"]["k"] == round(embedded ** 0.5)
    assert read_table("out", "embeddings").num_rows == embedded
    live = ann[ann.selected]
    assert live.ifd_status.notna().all() and live.rifd_status.notna().all()
    assert (live.ifd_status.isin(["ok", "response_truncated"]) == live.ifd_loss.notna()).all()
    assert man["score"]["model_rows"] == len(live) and man["score"]["ifd_ge_1_share"] is not None


def test_two_source_run_writes_all_outputs_and_accounts_for_every_row(two_sources):
    for name in ("annotated", "selected", "rejects", "manifest.json"):
        assert os.path.exists(two_sources / name)
    man = load_manifest(two_sources)
    n_in = len(json.load(open(shared("alpaca_cherry_5pct.json")))) + len(json.load(open(shared("gsm8k_train.json"))))
    acc = man["accounting"]
    assert acc["holds"] and acc["rows_in"] == n_in == 10584
    assert acc["rows_in"] == acc["selected"] + acc["dropped"] + acc["rejected"]
    files = _accounted_from_files(two_sources)
    assert files["selected"] == acc["selected"] == read_table(two_sources, "selected").num_rows
    assert files["dropped"] == man["counts"]["dropped"]
    assert files["rejected"] == man["counts"]["rejected"]
    assert set(man["counts"]["by_source"]) == {"alpaca_cherry", "gsm8k"}
    assert man["versions"]["apache-beam"] and man["inputs"][0]["sha256"]
    assert {"read", "validate", "ids", "exact_dedup", "near_dedup", "write"} <= set(man["stages"])


def test_outputs_read_back_with_the_documented_schema(two_sources):
    held = load_manifest(two_sources)["outputs"]["columns"]
    for name in ("annotated", "selected", "rejects"):
        with open(os.path.join(REPO, "schemas", f"{name}.json")) as fh:
            documented = json.load(fh)
        # selected/ holds the documented columns the manifest lists (the stages that ran, no dedup columns)
        documented["fields"] = [f for f in documented["fields"] if f["name"] in held[name]]
        table = pq.read_table(two_sources / name)
        assert [f.name for f in table.schema] == [f["name"] for f in documented["fields"]]
        assert [str(f.type) for f in table.schema] == [f["type"] for f in documented["fields"]]
        meta = table.schema.metadata
        assert meta[b"curate.schema"].decode() == name
        assert meta[b"curate.schema_version"].decode() == schema.SCHEMA_VERSION
        df = pd.read_parquet(two_sources / name)
        assert list(df.columns) == [f["name"] for f in documented["fields"]]
    sel = pd.read_parquet(two_sources / "selected")
    assert sel.selected.all() and "drop_reason" not in sel.columns and len(held["annotated"]) == len(schema.ANNOTATED)
    assert sel.messages.iloc[0][-1]["role"] == "assistant"


def test_bad_rows_go_to_rejects_and_the_job_goes_on(job_dir):
    good = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(6)]
    lines = [json.dumps(r).encode() for r in good[:4]] + [
        b'{"instruction": "broken", "output": ',                              # malformed_json
        b'{"instruction": "caf\xe9", "output": "latin-1 bytes"}',             # undecodable_bytes
        json.dumps({"instruction": "no output"}).encode(),                     # missing_field
        json.dumps({"instruction": "number", "output": 42}).encode(),          # wrong_type
        json.dumps({"instruction": "empty", "output": "  "}).encode(),         # empty_response
        json.dumps({"instruction": "long", "output": "x" * 500}).encode(),     # too_long
        json.dumps(["a", "list"]).encode(),                                    # not_an_object
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),  # no_response
        json.dumps({"messages": [{"speaker": "?"}]}).encode(),                 # bad_messages
    ]
    (job_dir / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (job_dir / "more.json").write_text(json.dumps(good[4:]))
    job = write_job(job_dir, without_models({"output": "out", "validate": {"max_chars": 300}, "inputs": [
        {"source": "mixed", "path": "mixed.jsonl"}, {"source": "more", "path": "more.json"}]}))
    assert run_cli("run", job) == 0
    rej = pd.read_parquet("out/rejects")
    assert sorted(rej.reason) == sorted(["malformed_json", "undecodable_bytes", "missing_field", "wrong_type",
                                         "empty_response", "too_long", "not_an_object", "no_response",
                                         "bad_messages"])
    assert rej.set_index("reason").loc["malformed_json", "raw"] == '{"instruction": "broken", "output": '
    assert rej.set_index("reason").loc["malformed_json", "row_number"] == 5
    assert "\\xe9" in rej.set_index("reason").loc["undecodable_bytes", "raw"]
    assert (rej.detail.str.len() > 0).all()
    ann = pd.read_parquet("out/annotated")
    assert sorted(ann.prompt) == sorted(r["instruction"] for r in good)
    assert load_manifest("out")["accounting"]["holds"]


def _shuffled_copies(folder, seed=3) -> list[dict]:
    rng = random.Random(seed)
    inputs = []
    for spec in DEMO_INPUTS:
        src = spec["path"]
        name = os.path.basename(src)
        dst = os.path.join(str(folder), "shuffled_" + name)
        if src.endswith(".jsonl"):
            lines = open(src, encoding="utf-8").read().rstrip("\n").split("\n")  # not splitlines(): U+2028 occurs
            rng.shuffle(lines)
            open(dst, "w").write("\n".join(lines) + "\n")
        else:
            rows = json.load(open(src))
            rng.shuffle(rows)
            json.dump(rows, open(dst, "w"))
        inputs.append({**spec, "path": dst})
    return inputs


def test_shuffled_input_selects_the_same_ids(job_dir):
    assert run_cli("run", write_job(job_dir, without_models({"output": "a", "inputs": DEMO_INPUTS}), "a.yaml")) == 0
    assert run_cli("run", write_job(job_dir, without_models({"output": "b", "inputs": _shuffled_copies(job_dir)}), "b.yaml")) == 0
    assert ids("a") == ids("b")
    assert ids("a", "annotated") == ids("b", "annotated")
    ann_a = read_table("a", "annotated").to_pandas().set_index("id").sort_index()
    ann_b = read_table("b", "annotated").to_pandas().set_index("id").sort_index()
    assert ann_a.exact_dup_of.fillna("").equals(ann_b.exact_dup_of.fillna(""))
    assert load_manifest("a")["counts"]["dropped"] == {"exact_duplicate": 5, "near_duplicate": 5}
    assert ann_a.near_dup_of.fillna("").equals(ann_b.near_dup_of.fillna(""))


@pytest.mark.parametrize("flags", [
    ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
], ids=["multi_processing", "portable_loopback"])
def test_other_runners_select_the_same_ids(job_dir, flags):
    assert run_cli("run", write_job(job_dir, without_models({"output": "ref", "inputs": DEMO_INPUTS}), "ref.yaml")) == 0
    assert run_cli("run", write_job(job_dir, without_models({"output": "other", "inputs": DEMO_INPUTS}), "o.yaml"), *flags) == 0
    assert ids("ref") == ids("other") and len(ids("ref")) == 400
    runner = load_manifest("other")["beam_options"]
    for flag in flags:
        key, value = flag[2:].split("=")
        assert str(runner[key]) == value


def test_a_job_runs_without_dask_installed(job_dir, tmp_path):
    """`make demo` installs curate without its dev extras: dask is absent there, and only
    --runner=DaskRunner may need it (a job once failed on the import of our Dask runner)."""
    import subprocess
    import sys

    cfg = {"output": "nodask", "inputs": DEMO_INPUTS, "sample": {"mode": "head", "n": 5}}
    job = write_job(job_dir, without_models(cfg))
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['dask'] = None  # `import dask` fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), REPO])}
    run = [sys.executable, "-m", "curate.cli", "run", job]
    done = subprocess.run(run, cwd=job_dir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(ids(os.path.join(job_dir, "nodask"))) > 0
    done = subprocess.run(run + ["--runner=DaskRunner", "--overwrite"], cwd=job_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "curate: error: --runner=DaskRunner needs dask.distributed: pip install 'dask[distributed]'"], done.stderr


def test_batch_size_does_not_change_the_selection(job_dir):
    assert run_cli("run", write_job(job_dir, without_models({"output": "a", "inputs": DEMO_INPUTS, "batch_size": 7}))) == 0
    assert run_cli("run", write_job(job_dir, without_models({"output": "b", "inputs": DEMO_INPUTS, "batch_size": 1000}))) == 0
    assert ids("a") == ids("b")


def test_exact_dedup_scope_and_cross_source_keep_rule(job_dir):
    row = {"instruction": "Name a colour.", "output": "Blue."}
    (job_dir / "first.json").write_text(json.dumps([row, {"instruction": "x", "output": "y"}]))
    (job_dir / "second.json").write_text(json.dumps([{"instruction": "NAME a  colour.", "output": "blue."}]))
    inputs = [{"source": "second", "path": "second.json"}, {"source": "first", "path": "first.json"}]
    assert run_cli("run", write_job(job_dir, without_models({"output": "g", "inputs": inputs}))) == 0
    ann = pd.read_parquet("g/annotated").set_index("source")
    assert ann.loc["second", "selected"]  # listed first in inputs, so it is kept
    dropped = ann[~ann.selected]
    assert list(dropped.drop_reason) == ["exact_duplicate"]
    assert dropped.exact_dup_of.iloc[0] == ann.loc["second", "id"]
    assert run_cli("run", write_job(job_dir, without_models({"output": "s", "inputs": inputs,
                                              "dedup": {"exact": {"scope": "source"}, "near": {"enabled": False}}}))) == 0
    assert pd.read_parquet("s/annotated").selected.all()
    # with near dedup on (global scope), the cross-source copy is still caught, as a near duplicate
    assert run_cli("run", write_job(job_dir, without_models({"output": "n", "inputs": inputs,
                                              "dedup": {"exact": {"scope": "source"}}}))) == 0
    assert sorted(pd.read_parquet("n/annotated").drop_reason.dropna()) == ["near_duplicate"]


def test_user_id_duplicates_are_rejected_and_identical_rows_deduplicated(job_dir):
    rows = [{"uid": "1", "instruction": "a", "output": "b"}, {"uid": "1", "instruction": "a", "output": "b"},
            {"uid": "1", "instruction": "other", "output": "c"}, {"uid": "2", "instruction": "d", "output": "e"}]
    (job_dir / "u.json").write_text(json.dumps(rows))
    job = write_job(job_dir, without_models({"output": "out", "inputs": [{"source": "u", "path": "u.json", "id_field": "uid"}]}))
    assert run_cli("run", job) == 0
    assert list(pd.read_parquet("out/rejects").reason) == ["duplicate_id"]
    ann = pd.read_parquet("out/annotated").set_index("id")
    assert sorted(ann.index) == ["u:1", "u:1#2", "u:2"]
    assert ann.loc["u:1#2", "drop_reason"] == "exact_duplicate" and ann.loc["u:1#2", "exact_dup_of"] == "u:1"


def test_user_ids_may_repeat_across_sources(job_dir):
    (job_dir / "a.json").write_text(json.dumps([{"n": 0, "instruction": "Say hi.", "output": "Hi."}]))
    (job_dir / "b.json").write_text(json.dumps([{"n": 0, "instruction": "Count to two.", "output": "1, 2."}]))
    job = write_job(job_dir, without_models({"output": "out", "inputs": [{"source": "a", "path": "a.json", "id_field": "n"},
                                                          {"source": "b", "path": "b.json", "id_field": "n"}]}))
    assert run_cli("run", job) == 0
    assert ids("out") == ["a:0", "b:0"]


def test_sampling_head_and_random(job_dir):
    job = write_job(job_dir, without_models({"output": "h", "inputs": DEMO_INPUTS, "sample": {"mode": "head", "n": 10}}))
    assert run_cli("run", job) == 0
    man = load_manifest("h")
    assert man["counts"]["rows_in"] == 30
    assert man["stages"]["read"]["rows_seen"] == 30  # head stops reading after n rows
    for seed_out in ("r1", "r2"):
        job = write_job(job_dir, without_models({"output": seed_out, "seed": 5, "inputs": DEMO_INPUTS,
                                  "sample": {"mode": "random", "n": 20}}))
        assert run_cli("run", job) == 0
    assert ids("r1", "annotated") == ids("r2", "annotated") and len(ids("r1", "annotated")) == 60


def test_output_is_atomic_and_not_overwritten_by_accident(job_dir, capsys):
    job = write_job(job_dir, without_models({"output": "out", "inputs": DEMO_INPUTS[:1]}))
    assert run_cli("run", job) == 0
    first = load_manifest("out")["timing"]["started"]
    assert run_cli("run", job) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert run_cli("run", job, "--overwrite") == 0
    assert load_manifest("out")["timing"]["started"] >= first
    # a file that breaks while the job runs: one-line error, and no folder that looks complete
    (job_dir / "bad.json").write_text('[{"instruction": "a", "output": "b"}, {')
    job = write_job(job_dir, without_models({"output": "broken", "inputs": [{"source": "bad", "path": "bad.json"}]}))
    assert run_cli("run", job) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("curate: error: ") and "bad.json: not valid JSON" in err[-1]
    assert not [p for p in os.listdir(job_dir) if p.startswith("broken")]


def test_selected_holds_no_all_null_column_and_the_manifest_lists_each_outputs_columns(job_dir):
    """selected/ leaves out drop_reason and the columns of stages that did not run (here every
    model stage); annotated/ keeps the full schema; `curate select` writes the run's columns."""
    import pyarrow.compute as pc

    from curate import schema

    cfg = without_models({"output": "lean", "inputs": DEMO_INPUTS, "select": {"policy": "random",
                                                                             "budget": {"fraction": 0.5}}})
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    sel, ann = read_table("lean", "selected"), read_table("lean", "annotated")
    assert ann.schema.names == schema.ANNOTATED.names
    assert sel.num_rows > 0 and "drop_reason" not in sel.schema.names and "ifd_loss" not in sel.schema.names
    assert [c for c in sel.schema.names if sel.column(c).null_count == sel.num_rows] == []
    assert {"id", "source", "messages", "prompt", "response", "instruction", "rank"} <= set(sel.schema.names)
    assert "exact_dup_of" in ann.schema.names and "exact_dup_of" not in sel.schema.names
    assert load_manifest("lean")["outputs"]["columns"]["selected"] == sel.schema.names
    assert run_cli("select", "lean", "--policy", "top_k", "--param", "column=approx_tokens", "--rows", "5") == 0
    again = pq.read_table(os.path.join("lean", "selections", "top_k", "selected"))
    assert again.schema.names == sel.schema.names and again.num_rows == 5
    assert pc.all(pc.is_valid(again.column("rank"))).as_py()
