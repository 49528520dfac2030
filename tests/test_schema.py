import json
import os

from curate import schema
from tests.conftest import REPO


def test_schema_json_copies_match_the_code():
    for name, sch in schema.SCHEMAS.items():
        with open(os.path.join(REPO, "schemas", f"{name}.json"), encoding="utf-8") as fh:
            assert json.load(fh) == schema.describe(sch), f"run: python -m curate.schema schemas"


def test_every_field_is_documented():
    for sch in schema.SCHEMAS.values():
        assert all(schema.FIELD_DOCS.get(f.name) for f in sch)


def test_manifests_of_real_runs_follow_the_manifest_schema(tmp_path, monkeypatch):
    import jsonschema

    from tests.conftest import EXAMPLES, load_manifest, run_cli, without_models, write_job

    with open(os.path.join(REPO, "schemas", "manifest.schema.json"), encoding="utf-8") as fh:
        manifest_schema = json.load(fh)
    monkeypatch.chdir(tmp_path)
    inputs = [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}]
    for name, cfg in (("plain", without_models({"output": "plain", "inputs": inputs})),
                      ("models", {"output": "models", "inputs": inputs, "sample": {"mode": "head", "n": 6},
                                  "score": {"ifd": {"cache_dir": str(tmp_path / "scores")}}})):
        assert run_cli("run", write_job(tmp_path, cfg, f"{name}.yaml")) == 0
        jsonschema.validate(load_manifest(name), manifest_schema)
    broken = load_manifest("plain")
    broken["accounting"]["holds"] = False
    try:
        jsonschema.validate(broken, manifest_schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("a manifest whose accounting does not hold must not validate")


def test_selected_schema_follows_the_stages_a_job_runs():
    from curate import config, schema

    base = {"output": "o", "inputs": [{"source": "a", "path": "a.jsonl"}]}
    full = schema.selected_schema(config.validate(base, check_files=False)).names
    assert "ifd_loss" in full and "cluster_id" in full and "rds_score" not in full  # rds is off by default
    assert not set(schema.SELECTED_OMITS) & set(full) and "drop_reason" in schema.ANNOTATED.names
    no_embed = config.validate({**base, "embed": {"enabled": False}, "dedup": {"semantic": {"enabled": False}},
                                "cluster": {"enabled": False, "column": "topic"}}, check_files=False)
    assert "cluster_id" in schema.selected_schema(no_embed).names  # clusters read from an input field
    no_cluster = config.validate({**base, "embed": {"enabled": False}, "dedup": {"semantic": {"enabled": False}},
                                  "cluster": {"enabled": False}}, check_files=False)
    assert "cluster_id" not in schema.selected_schema(no_cluster).names


def test_a_runs_selected_columns_come_from_its_manifest_else_its_files_else_every_column(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate import runs, schema

    run = tmp_path / "run"
    (run / "selected").mkdir(parents=True)
    man = {"outputs": {"columns": {"selected": ["id", "source", "rank"]}}}
    (run / "manifest.json").write_text(json.dumps(man))
    assert runs.selected_columns(str(run)) == ["id", "source", "rank"]
    (run / "manifest.json").write_text(json.dumps({"outputs": {}}))  # a run from before schema 2.0
    assert runs.selected_columns(str(run)) == schema.SELECTED.names  # and an empty selected/
    pq.write_table(pa.table({"id": ["x"], "source": ["a"]}), run / "selected" / "part-0.parquet")
    assert runs.selected_columns(str(run)) == ["id", "source"]
