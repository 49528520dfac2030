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
