import dataclasses

import pytest

from curate.config import ConfigError, apply_overrides, load, validate
from curate.settings import ExactDedup
from tests.conftest import EXAMPLES, write_job


def _job(**extra):
    cfg = {"output": "out", "inputs": [{"source": "a", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}]}
    cfg.update(extra)
    return cfg


def test_defaults_filled():
    cfg = validate(_job())
    assert cfg.dedup.exact == ExactDedup(enabled=True, scope="global")
    assert cfg.beam["runner"] == "FnApiRunner"
    assert cfg.sample.seed == 0
    assert cfg.inputs[0].files[0].format == "jsonl"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # typed and frozen: a stage cannot change the job under another


def test_schema_is_derived_from_the_settings_and_round_trips():
    from curate.config import SCHEMA
    from curate.settings import Job, build, schema_of, to_dict

    assert SCHEMA == schema_of(Job)
    cfg = validate(_job(select={"policy": "random", "budget": {"rows": 3}}))
    assert build(Job, to_dict(cfg)).select == cfg.select


@pytest.mark.parametrize("cfg, message", [
    (_job(dedupe={}), "unknown key 'dedupe' (did you mean 'dedup'?)"),
    (_job(dedup={"exact": {"scop": "global"}}), "unknown key 'dedup.exact.scop' (did you mean 'scope'?)"),
    (_job(dedup={"exact": {"scope": "world"}}), "dedup.exact.scope: 'world' is not one of global, source"),
    (_job(seed="x"), "seed: expected int"),
    (_job(sample={"mode": "random"}), "exactly one of n or fraction"),
    ({"inputs": _job()["inputs"]}, "output: required key is missing"),
    (_job(inputs=[{"source": "a", "path": "nope/*.jsonl"}]), "inputs[0].path: no file matches 'nope/*.jsonl'"),
])
def test_errors_are_one_line_and_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides():
    raw = apply_overrides(_job(), ["sample.mode=head", "sample.n=5", "inputs.0.source=b", "beam.direct_num_workers=2"])
    cfg = validate(raw)
    assert cfg.sample.n == 5 and cfg.inputs[0].source == "b"
    assert cfg.beam["direct_num_workers"] == 2
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(_job(), ["inputs.3.source=x"])


def test_load_names_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such job file"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))
    assert load(write_job(tmp_path, _job(), "named.yaml")).name == "named"


def test_select_problems_are_caught_before_the_run(job_dir):
    from curate.config import ConfigError, validate

    base = {"output": "out", "inputs": [{"source": "s", "path": "x.jsonl"}]}
    (job_dir / "x.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cases = [({"policy": "top_k", "params": {"column": "ifd_loss"}}, "needs a budget"),
             ({"policy": "superfiltering", "budget": {"rows": 5}}, "needs the column ifd_loss; enable score.ifd"),
             ({"policy": "cluster_balanced", "budget": {"rows": 5}}, "needs the column cluster_id; enable cluster"),
             ({"policy": "deita", "params": {"column": "ifd_loss"}}, "needs embeddings"),
             ({"policy": "all", "budget": {"rows": 5, "fraction": 0.5}}, "give one of rows, fraction or tokens"),
             ({"policy": "nope"}, "unknown policy 'nope'"),
             ({"policy": "random", "budget": {"rows": 5}, "scope": "cluster"},
              "scope cluster needs cluster ids: enable embed and cluster, or set cluster.column"),
             ({"policy": "mixture", "params": {"shares": {"s": 1}}, "budget": {"rows": 5}, "scope": "cluster"},
              "policy mixture cannot run with scope cluster")]
    off = {"embed": {"enabled": False}, "cluster": {"enabled": False}, "score": {"ifd": {"enabled": False}},
           "dedup": {"semantic": {"enabled": False}}}
    for select, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
            validate({**base, **off, "select": select})
    assert validate({**base, "select": {"policy": "superfiltering", "budget": {"fraction": 0.1}}}).select.seed == 0
    given = {**off, "cluster": {"enabled": False, "column": "topic"}}  # the rows carry their clusters
    for policy in ({"policy": "random", "scope": "cluster"}, {"policy": "cluster_balanced"}):
        assert validate({**base, **given, "select": {**policy, "budget": {"rows": 5}}}).cluster.column == "topic"


def test_a_given_cluster_id_is_an_integer_or_nothing():
    import json

    from curate.cluster import given_cluster

    for value, want in ((3, 3), ("7", 7), (" -2", -2), ("x", None), (1.5, None), (True, None), (None, None),
                        (2**31, None), (-2**31, -2**31)):
        assert given_cluster(json.dumps({"topic": value}), "topic") == want
    assert given_cluster(json.dumps({"other": 1}), "topic") is None and given_cluster(None, "topic") is None
