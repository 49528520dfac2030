"""Job files: load YAML, apply ``--set`` overrides, validate strictly, fill defaults.

Every key is declared below with its type and default. An unknown or mistyped
key, a wrong type or a missing input file is a ``ConfigError`` whose message is
one line naming the key (the CLI prints it and exits with code 2).
Relative paths are taken from the current working directory.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from curate.io import FORMATS, SourceReadError, detect_format, preflight, resolve_paths
from curate.options import REQUIRED, ConfigError, FreeMap, ListOf, Opt, _check, check_value  # noqa: F401
from curate.records import FORMS, FieldMap

SEMANTIC_KEEP = ("least_similar_to_centroid", "most_similar_to_centroid", "longest_response")

_FIELDS = {name: Opt((str,), default) for name, default in FieldMap().__dict__.items()}

SCHEMA: dict = {
    "name": Opt((str,), None),
    "output": Opt((str,), REQUIRED),
    "seed": Opt((int,), 0),
    "inputs": ListOf({
        "source": Opt((str,), REQUIRED),
        "path": Opt((str, list), REQUIRED),
        "format": Opt((str,), "auto", choices=FORMATS),
        "form": Opt((str,), "auto", choices=FORMS),
        "id_field": Opt((str,), None),
        "fields": _FIELDS,
    }),
    "sample": {
        "mode": Opt((str,), "none", choices=("none", "head", "random")),
        "n": Opt((int,), None, minimum=1),
        "fraction": Opt((float, int), None, minimum=0.0, maximum=1.0),
        "seed": Opt((int,), None),
    },
    "validate": {
        "max_chars": Opt((int,), 100_000, minimum=1),
    },
    "dedup": {
        "exact": {
            "enabled": Opt((bool,), True),
            "scope": Opt((str,), "global", choices=("global", "source")),
        },
        "near": {
            "enabled": Opt((bool,), True),
            "threshold": Opt((float,), 0.8, minimum=0.01, maximum=0.99),
            "num_perm": Opt((int,), 128, minimum=8, maximum=1024),
            "ngram": Opt((int,), 5, minimum=1, maximum=64),
            "unit": Opt((str,), "word", choices=("word", "char")),
            "text": Opt((str,), "prompt_response", choices=("prompt_response", "response")),
            "bands": Opt((int,), None, minimum=1),
            "rows": Opt((int,), None, minimum=1),
            "fp_weight": Opt((float,), 0.5, minimum=0.0),
            "fn_weight": Opt((float,), 0.5, minimum=0.0),
            "verify": Opt((bool,), True),
            "scope": Opt((str,), "global", choices=("global", "source")),
            "max_bucket_size": Opt((int,), 1000, minimum=2),
            "seed": Opt((int,), None),
        },
        "semantic": {
            "enabled": Opt((bool,), True),
            "eps": Opt((float,), 0.01, minimum=0.0, maximum=1.0),
            "keep": Opt((str,), "least_similar_to_centroid", choices=SEMANTIC_KEEP),
            "block_size": Opt((int,), 2048, minimum=16),
        },
    },
    "embed": {
        "enabled": Opt((bool,), True),
        "model": Opt((str,), "all-MiniLM-L6-v2"),
        "text": Opt((str,), "whole", choices=("whole", "instruction", "response")),
        "max_seq_length": Opt((int,), 256, minimum=8),
        "batch_size": Opt((int,), 64, minimum=1),
        "device": Opt((str,), "auto", choices=("auto", "cpu", "cuda")),
        "dtype": Opt((str,), "auto", choices=("auto", "float32", "bfloat16", "float16")),
        "cpu_linear": Opt((str,), "onednn", choices=("onednn", "torch")),
        "reuse": Opt((str,), None),
    },
    "score": {
        "ifd": {
            "enabled": Opt((bool,), True),
            "model": Opt((str,), "SmolLM2-135M-Instruct"),
            "template": Opt((str,), "none", choices=("none", "alpaca", "chat")),
            "max_length": Opt((int,), 1024, minimum=8),
            "superfiltering_compat": Opt((bool,), False),
            "batch_size": Opt((int,), 256, minimum=1),
            "batch_tokens": Opt((int,), None, minimum=1),
            "cpu_linear": Opt((str,), "onednn", choices=("onednn", "torch")),
            "bucket_rows": Opt((int,), 128, minimum=1),
            "device": Opt((str,), "auto", choices=("auto", "cpu", "cuda")),
            "dtype": Opt((str,), "auto", choices=("auto", "float32", "bfloat16", "float16")),
            "cache": Opt((bool,), True),
            "cache_dir": Opt((str,), None),
        },
    },
    "cluster": {
        "enabled": Opt((bool,), True),
        "k": Opt((int,), None, minimum=1),
        "k_min": Opt((int,), 2, minimum=1),
        "k_max": Opt((int,), 1024, minimum=1),
        "niter": Opt((int,), 20, minimum=1),
        "sample_per_centroid": Opt((int,), 256, minimum=1),
        "max_sample": Opt((int,), 100_000, minimum=1),
        "seed": Opt((int,), None),
        "device": Opt((str,), "auto", choices=("auto", "cpu", "cuda")),
    },
    "select": {
        "policy": Opt((str,), "all"),
        "params": FreeMap(),
        "budget": {
            "rows": Opt((int,), None, minimum=0),
            "fraction": Opt((int, float), None, minimum=0.0, maximum=1.0),
            "tokens": Opt((int,), None, minimum=0),
        },
        "seed": Opt((int,), None),
    },
    "batch_size": Opt((int,), 512, minimum=1),
    "beam": FreeMap(),
}

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


def _resolve_inputs(inputs: list[dict]) -> list[dict]:
    seen = set()
    for i, spec in enumerate(inputs):
        if spec["source"] in seen:
            raise ConfigError(f"inputs[{i}].source: {spec['source']!r} is used twice")
        seen.add(spec["source"])
        patterns = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
        files = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ConfigError(f"inputs[{i}].path: expected text, got {pattern!r}")
            matched = resolve_paths(pattern)
            if not matched:
                raise ConfigError(f"inputs[{i}].path: no file matches {pattern!r}")
            files.extend(matched)
        resolved = []
        for path in files:
            try:
                fmt = detect_format(path, spec["format"])
                preflight(path, fmt)
            except SourceReadError as err:
                raise ConfigError(f"inputs[{i}] ({spec['source']}): {err}") from None
            resolved.append({"path": os.path.abspath(path), "format": fmt})
        spec["files"] = resolved
    return inputs


def _check_select(cfg: dict) -> None:
    """The policy exists, its parameters and the budget are valid (one line naming the problem)."""
    from curate.select import Budget, PolicyError, make

    sel = cfg["select"]
    if sel["seed"] is None:
        sel["seed"] = cfg["seed"]
    sel["budget"] = {k: v for k, v in sel["budget"].items() if v is not None}
    try:
        Budget.parse(sel["budget"], "select.budget")
        policy = make(sel["policy"], sel["params"])
    except PolicyError as err:
        raise ConfigError(f"select: {err}") from None
    if policy.wants_embeddings() and not cfg["embed"]["enabled"]:
        raise ConfigError(f"select: policy {sel['policy']} needs embeddings; enable the embed stage")
    if policy.needs_budget and not sel["budget"]:
        raise ConfigError(f"select: policy {sel['policy']} needs a budget (select.budget.rows, fraction or tokens)")
    from curate.schema import SCORE_FIELDS

    stage_of = {f.name: ("score.ifd", cfg["score"]["ifd"]["enabled"]) for f in SCORE_FIELDS}
    stage_of.update({c: ("cluster", cfg["cluster"]["enabled"] and cfg["embed"]["enabled"])
                     for c in ("cluster_id", "cluster_sim")})
    for column in policy.required_columns():
        stage, on = stage_of.get(column, (None, True))
        if not on:
            raise ConfigError(f"select: policy {sel['policy']} needs the column {column}; enable {stage}")


def validate(raw: Any, *, check_files: bool = True) -> dict:
    """A resolved job config (a plain dict) or ConfigError."""
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
    _check_select(cfg)
    near = cfg["dedup"]["near"]
    if near["seed"] is None:
        near["seed"] = cfg["seed"]
    if (near["bands"] is None) != (near["rows"] is None):
        raise ConfigError("dedup.near: set both bands and rows, or neither (then they follow the threshold)")
    if near["bands"] is not None and near["bands"] * near["rows"] > near["num_perm"]:
        raise ConfigError(f"dedup.near: bands x rows ({near['bands'] * near['rows']}) exceeds "
                          f"num_perm ({near['num_perm']})")
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
    if check_files:
        _resolve_inputs(cfg["inputs"])
    return cfg


def load(path: str, overrides: list[str] | None = None, *, check_files: bool = True) -> dict:
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
    cfg = validate(raw, check_files=check_files)
    if cfg["name"] is None:
        cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    return cfg
