"""Job files: load YAML, apply ``--set`` overrides, validate strictly, fill defaults.

Every key is declared once, with its type and default, as a field of the typed settings
(``curate.settings``); the checks here run on the raw YAML. An unknown or mistyped
key, a wrong type or a missing input file is a ``ConfigError`` whose message is
one line naming the key (the CLI prints it and exits with code 2).
Relative paths are taken from the current working directory.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from curate import storage
from curate.io import SourceReadError, detect_format, preflight, resolve_paths
from curate.options import ConfigError, _check
from curate.settings import InputFile, Job, build, schema_of

SCHEMA: dict = schema_of(Job)

DEFAULT_BEAM = {"runner": "FnApiRunner"}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (value parsed as YAML); list items by index."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        value = yaml.safe_load(text) if text != "" else None
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of the list "
                                      f"{'.'.join(parts[:i])!r}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                    if node is None:
                        node = {}
    return raw


def _resolve_inputs(inputs: list[dict], section: str = "inputs") -> list[dict]:
    seen = set()
    for i, spec in enumerate(inputs):
        if spec["source"] in seen:
            raise ConfigError(f"{section}[{i}].source: {spec['source']!r} is used twice")
        seen.add(spec["source"])
        patterns = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
        files = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ConfigError(f"{section}[{i}].path: expected text, got {pattern!r}")
            matched = resolve_paths(pattern)
            if not matched:
                raise ConfigError(f"{section}[{i}].path: no file matches {pattern!r}")
            files.extend(matched)
        resolved = []
        for path in files:
            try:
                fmt = detect_format(path, spec["format"])
                preflight(path, fmt)
            except SourceReadError as err:
                raise ConfigError(f"{section}[{i}] ({spec['source']}): {err}") from None
            resolved.append(InputFile(storage.absolute(path), fmt))
        spec["files"] = tuple(resolved)
    return inputs


def _check_select(cfg: dict):
    """The policy exists, its parameters and the budget are valid (one line naming the problem)."""
    from curate.select import Budget, PolicyError, make

    sel = cfg["select"]
    if sel["seed"] is None:
        sel["seed"] = cfg["seed"]
    given = {k: v for k, v in sel["budget"].items() if v is not None}
    try:
        Budget.parse(given, "select.budget")
        policy = make(sel["policy"], sel["params"])
    except PolicyError as err:
        raise ConfigError(f"select: {err}") from None
    if policy.wants_embeddings() and not cfg["embed"]["enabled"]:
        raise ConfigError(f"select: policy {sel['policy']} needs embeddings; enable the embed stage")
    if policy.needs_budget and not given:
        raise ConfigError(f"select: policy {sel['policy']} needs a budget (select.budget.rows, fraction or tokens)")
    if sel["scope"] not in policy.supported_scopes():
        raise ConfigError(f"select: policy {sel['policy']} cannot run with scope {sel['scope']} (it supports "
                          f"{', '.join(policy.supported_scopes())}: its decision spans the whole pool)")
    clusters = cfg["cluster"]["column"] or (cfg["cluster"]["enabled"] and cfg["embed"]["enabled"])
    if sel["scope"] == "cluster" and not clusters:
        raise ConfigError("select: scope cluster needs cluster ids: enable embed and cluster, or set cluster.column")
    return policy


def _check_columns(job: Job, policy) -> None:
    """Every column the policy needs is declared by a stage that this job runs."""
    from curate.schema import stage_of

    for column in policy.required_columns():
        stage = stage_of(column)
        off = stage.switches_off(job) if stage is not None else []
        if column == "cluster_id" and job.cluster.column:  # the input rows give the clusters
            off = []
        if off:
            off = " and ".join(off)
            raise ConfigError(f"select: policy {job.select.policy} needs the column {column}; enable {off}")


def validate(raw: Any, *, check_files: bool = True, name: str | None = None) -> Job:
    """The typed, resolved job settings (``curate.settings.Job``) or ConfigError. ``name``: the
    job's name when the file sets none."""
    if not isinstance(raw, dict):
        raise ConfigError("job file: expected a mapping at the top level")
    cfg = _check(raw, SCHEMA, "")
    sample = cfg["sample"]
    if sample["mode"] == "head" and sample["n"] is None:
        raise ConfigError("sample.n: required when sample.mode is head")
    if sample["mode"] == "random" and (sample["n"] is None) == (sample["fraction"] is None):
        raise ConfigError("sample: mode random needs exactly one of n or fraction")
    if sample["seed"] is None:
        sample["seed"] = cfg["seed"]
    policy = _check_select(cfg)
    near = cfg["dedup"]["near"]
    if near["seed"] is None:
        near["seed"] = cfg["seed"]
    if (near["bands"] is None) != (near["rows"] is None):
        raise ConfigError("dedup.near: set both bands and rows, or neither (then they follow the threshold)")
    if near["bands"] is not None and near["bands"] * near["rows"] > near["num_perm"]:
        raise ConfigError(f"dedup.near: bands x rows ({near['bands'] * near['rows']}) exceeds "
                          f"num_perm ({near['num_perm']})")
    deg = cfg["score"]["degradation"]
    if deg["enabled"] and not deg["compressed"]:
        raise ConfigError("score.degradation.compressed: required when score.degradation.enabled is true "
                          "(a folder made by `curate compress`)")
    if deg["enabled"] and check_files and not os.path.exists(deg["compressed"]):
        raise ConfigError(f"score.degradation.compressed: no such model folder {deg['compressed']!r}")
    if cfg["cluster"]["seed"] is None:
        cfg["cluster"]["seed"] = cfg["seed"]
    if cfg["cluster"]["enabled"] and not cfg["embed"]["enabled"]:
        raise ConfigError("cluster.enabled needs embed.enabled (clusters are built on the embeddings)")
    if cfg["dedup"]["semantic"]["enabled"] and not cfg["cluster"]["enabled"]:
        raise ConfigError("dedup.semantic.enabled needs cluster.enabled (SemDeDup compares rows inside clusters)")
    if near["bands"] is None:
        from curate.dedup.near import optimal_bands_rows

        near["bands"], near["rows"] = optimal_bands_rows(near["threshold"], near["num_perm"],
                                                         near["fp_weight"], near["fn_weight"])
        near["bands_rows_from"] = "threshold"
    else:
        near["bands_rows_from"] = "job file"
    cfg["beam"] = {**DEFAULT_BEAM, **cfg["beam"]}
    realign = cfg["rewrite"]["realign"]
    if realign["enabled"] and not realign["classifier_train"]:
        raise ConfigError("rewrite.realign.enabled needs rewrite.realign.classifier_train: {instruction, category} "
                          "rows to train the task classifier on (for example ReAlign's "
                          "datasets/classification/task_classifier_train_dataset.json)")
    for stage in ("rds", "less"):
        if cfg["score"][stage]["enabled"] and not cfg["targets"]:
            raise ConfigError(f"score.{stage}.enabled needs targets: one or more target sets (source, path, form) "
                              "of examples of what the model should be good at")
    if check_files:
        _resolve_inputs(cfg["inputs"])
        _resolve_inputs(cfg["targets"], "targets")
    if cfg["name"] is None:
        cfg["name"] = name
    job = build(Job, cfg)
    _check_columns(job, policy)
    return job


def load(path: str, overrides: list[str] | None = None, *, check_files: bool = True) -> Job:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, check_files=check_files, name=os.path.splitext(os.path.basename(path))[0])
