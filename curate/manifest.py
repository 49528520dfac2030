"""The run manifest: resolved config, versions, inputs, counts per stage and reason, timing.

Built from the summed stage stats (see ``curate.stats``). ``accounting`` checks
the identity every run must satisfy: rows in = selected + dropped + rejected.
"""
from __future__ import annotations

import platform
import sys
from collections import defaultdict
from importlib import metadata

from curate.schema import SCHEMA_VERSION
from curate.settings import Job, to_dict
from curate.stats import END, START, parse_stat_key

MANIFEST_VERSION = "1.0"
# Pipeline order of the stages, for reports; a stage not listed sorts after these.
STAGE_ORDER = ("read", "validate", "ids", "exact_dedup", "rewrite_teacher", "rewrite_teacher_qa", "rewrite_student",
               "rewrite", "realign_classify", "realign_classify_teacher", "realign_category", "realign_teacher",
               "realign", "exact_dedup_rewritten", "near_dedup", "embed", "cluster", "semantic_dedup", "score",
               "rds_targets", "rds", "less_targets", "less", "degradation", "select", "write")


class AccountingError(Exception):
    """Rows were lost or counted twice: a bug, never a data problem."""


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("curate", "apache-beam", "pyarrow", "numpy", "torch", "transformers",
                 "sentence-transformers", "faiss-cpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def summarize(stats: dict[str, float]) -> dict:
    """Nested counts from flat stat keys: stages, totals and per-source breakdown."""
    stages: dict = defaultdict(lambda: defaultdict(float))
    by_source: dict = defaultdict(lambda: {"rows_in": 0, "selected": 0, "dropped": {}, "rejected": {}})
    totals = {"rows_in": 0, "selected": 0, "dropped": defaultdict(int), "rejected": defaultdict(int)}
    for key, value in stats.items():
        k = parse_stat_key(key)
        stage, metric, reason, source = k["stage"], k["metric"], k["reason"], k["source"] or "(none)"
        name = f"{metric}:{reason}" if reason else metric
        stages[stage][name] += value
        if stage == "read" and metric == "rows":
            totals["rows_in"] += int(value)
            by_source[source]["rows_in"] += int(value)
        elif stage == "write" and metric == "selected":
            totals["selected"] += int(value)
            by_source[source]["selected"] += int(value)
        elif stage == "write" and metric in ("dropped", "rejected"):
            reason = reason or "unspecified"  # a row dropped or rejected with no reason still counts
            totals[metric][reason] += int(value)
            bucket = by_source[source][metric]
            bucket[reason] = bucket.get(reason, 0) + int(value)
    stage_out = {}
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    for stage in sorted(stages, key=lambda s: (order.get(s, len(order)), s)):
        metrics = dict(stages[stage])
        for start in [m for m in metrics if m.endswith(START)]:  # a time span: X_start_t, X_end_t -> X_wall_s
            base = start[: -len(START)]
            end = metrics.pop(base + END, None)
            began = metrics.pop(start)
            if end is not None:
                metrics[base + "_wall_s"] = end - began
        clean = {m: (round(v, 3) if m.endswith("_s") else int(v)) for m, v in sorted(metrics.items())}
        stage_out[stage] = clean
    return {
        "rows_in": totals["rows_in"],
        "selected": totals["selected"],
        "dropped": dict(sorted(totals["dropped"].items())),
        "rejected": dict(sorted(totals["rejected"].items())),
        "by_source": {s: by_source[s] for s in sorted(by_source)},
        "stages": stage_out,
    }


def accounting(counts: dict) -> dict:
    dropped = sum(counts["dropped"].values())
    rejected = sum(counts["rejected"].values())
    out = counts["selected"] + dropped + rejected
    return {
        "rows_in": counts["rows_in"],
        "selected": counts["selected"],
        "dropped": dropped,
        "rejected": rejected,
        "holds": counts["rows_in"] == out,
        "identity": "rows_in = selected + dropped + rejected",
    }


def check_accounting(counts: dict) -> dict:
    acc = accounting(counts)
    if not acc["holds"]:
        raise AccountingError(
            f"rows in ({acc['rows_in']}) != selected ({acc['selected']}) + dropped ({acc['dropped']})"
            f" + rejected ({acc['rejected']})")
    for source, c in counts["by_source"].items():
        total = c["selected"] + sum(c["dropped"].values()) + sum(c["rejected"].values())
        if total != c["rows_in"]:
            raise AccountingError(f"source {source!r}: rows in ({c['rows_in']}) != {total} accounted for")
    return acc


def by_reason(stage: dict, metric: str) -> dict[str, int]:
    """``{reason: count}`` of a stage's ``metric:reason`` entries (see ``summarize``), sorted."""
    prefix = f"{metric}:"
    return {k[len(prefix):]: int(v) for k, v in sorted(stage.items()) if k.startswith(prefix)}


def near_dedup_report(cfg: Job, stages: dict, reports: dict) -> dict:
    """The near-dup section: parameters and S-curve points, removed rows, cluster sizes, examples."""
    from curate.dedup.near import candidate_probability

    p = cfg.dedup.near
    if not p.enabled:
        return {"enabled": False}
    st = stages.get("near_dedup", {})
    sizes = {int(r.removeprefix("size_")): n for r, n in by_reason(st, "clusters").items()}
    return {
        "enabled": True,
        "bands": p.bands, "rows": p.rows, "bands_rows_from": p.bands_rows_from,
        "threshold": p.threshold, "num_perm": p.num_perm, "shingles": f"{p.unit} {p.ngram}-grams",
        "text": p.text, "scope": p.scope, "verify": p.verify,
        "candidate_probability": {str(s): round(candidate_probability(s, p.bands, p.rows), 4)
                                  for s in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)},
        "removed": int(st.get("dropped", 0)),
        "clusters": sum(sizes.values()),
        "cluster_sizes": dict(sorted(sizes.items())),
        "edges_verified": int(st.get("edges_verified", 0)),
        "edges_rejected": int(st.get("edges_rejected", 0)),
        "big_buckets": int(st.get("big_buckets", 0)),
        "examples": reports.get("near_dedup.examples", []),
    }


def embed_cluster_report(cfg: Job, stages: dict, reports: dict, runtime: dict) -> dict:
    """Embedding model and device, k-means summary, semantic dedup with its eps sweep."""
    out: dict = {"embed": {"enabled": cfg.embed.enabled}}
    if cfg.embed.enabled:
        rt = {k: v for k, v in runtime.get("embed", {}).items() if k != "cache_files"}
        st = stages.get("embed", {})
        out["embed"].update({**rt, "model_rows": int(st.get("model_rows", 0)),
                             "cached_rows": int(st.get("cached", 0)), "text": cfg.embed.text,
                             "max_seq_length": cfg.embed.max_seq_length,
                             "batch_size": cfg.embed.batch_size})
    c = cfg.cluster
    out["cluster"] = {"enabled": c.enabled}
    if c.enabled:
        sizes = reports.get("cluster.sizes", [])
        model = reports.get("cluster.model", {})
        out["cluster"].update({
            "k": model.get("k"), "sample": model.get("sample"), "niter": c.niter, "seed": c.seed,
            "faiss_gpu": runtime.get("cluster", {}).get("faiss_gpu"),
            "nonempty_clusters": len(sizes),
            "size_min": min(sizes) if sizes else None, "size_max": max(sizes) if sizes else None,
            "size_median": sorted(sizes)[len(sizes) // 2] if sizes else None})
        sd = cfg.dedup.semantic
        st = stages.get("semantic_dedup", {})
        out["semantic_dedup"] = {
            "enabled": sd.enabled, "eps": sd.eps, "keep": sd.keep, "removed": int(st.get("dropped", 0)),
            "sweep_would_remove": {r.removeprefix("eps_"): n for r, n in by_reason(st, "sweep").items()}}
    return out


def _model_stage(stages: dict, stage: str, runtime: dict, status_metrics: dict) -> dict:
    """What every model stage reports: run-time choices (less the cache file list), rows, rows from
    the model and from the cache, and the share of each status (``{name: metric}``)."""
    st = stages.get(stage, {})
    rows = int(st.get("rows", 0))
    out = {k: v for k, v in runtime.items() if not k.startswith("cache_files")}
    out.update(rows=rows, model_rows=int(st.get("model_rows", 0)), cached_rows=int(st.get("cached", 0)))
    for name, metric in status_metrics.items():
        out[name] = {r: round(n / rows, 4) for r, n in by_reason(st, metric).items()} if rows else {}
    return out


def score_report(cfg: Job, stages: dict, runtime: dict) -> dict:
    """The IFD stage: model, settings, cache use, status shares and the share of IFD >= 1."""
    s = cfg.score.ifd
    if not s.enabled:
        return {"enabled": False}
    out = _model_stage(stages, "score", runtime.get("score", {}),
                       {"ifd_status_share": "ifd_status", "rifd_status_share": "rifd_status"})
    rows = out["rows"]
    ge_1 = int(stages.get("score", {}).get("ifd_ge_1", 0))
    return {"enabled": True, **out, "template": s.template, "max_length": s.max_length,
            "superfiltering_compat": s.superfiltering_compat,
            "ifd_ge_1_share": round(ge_1 / rows, 4) if rows else None}


def degradation_report(cfg: Job, stages: dict, runtime: dict) -> dict:
    """The degradation stage: the model pair, cache use and status shares."""
    d = cfg.score.degradation
    if not d.enabled:
        return {"enabled": False}
    out = _model_stage(stages, "degradation", runtime.get("degradation", {}), {"status_share": "status"})
    return {"enabled": True, **out, "cutoff": d.cutoff}


def targeted_report(stage: str, settings, stages: dict, runtime: dict) -> dict:
    """A targeted score's stage (``rds`` or ``less``): its run-time choices (for LESS the warm-up,
    checkpoints and weights and the projection), cache use, status shares, the target sets and
    their rows scored."""
    if not settings.enabled:
        return {"enabled": False}
    out = _model_stage(stages, stage, runtime.get(stage, {}), {"status_share": "status"})
    targets = stages.get(f"{stage}_targets", {})
    out["target_rows"] = {"model": int(targets.get("model_rows", 0)), "cached": int(targets.get("cached", 0))}
    return {"enabled": True, **out, "max_length": settings.max_length}


def rewrite_report(cfg: Job, stages: dict, runtime: dict) -> dict:
    """The rewrite stages: the teacher (its key's variable name only), requests sent and read from
    the cache, failures; reflection's student and rows per status and kind; ReAlign's classifier
    (and its test accuracy) and rows per status and post-filter reason."""
    w = cfg.rewrite
    if not (w.reflection.enabled or w.realign.enabled):
        return {"enabled": False}
    rt = runtime.get("rewrite", {})
    teacher = [stages.get(s, {}) for s in ("rewrite_teacher", "rewrite_teacher_qa", "realign_classify_teacher",
                                           "realign_teacher")]
    reflection, realign = stages.get("rewrite", {}), stages.get("realign", {})
    category = stages.get("realign_category", {})
    out = {"enabled": True, "teacher": rt.get("teacher"), "cache": rt.get("cache"),
           "requests_sent": sum(int(t.get("model_rows", 0)) for t in teacher),
           "requests_cached": sum(int(t.get("cached", 0)) for t in teacher),
           "requests_failed": sum(int(s.get("requests_failed", 0)) for s in (reflection, realign, category))}
    if w.reflection.enabled:
        out["reflection"] = {"student": {k: v for k, v in rt.get("student", {}).items() if k != "cache_files"},
                             "rows": int(reflection.get("rows", 0)), "status": by_reason(reflection, "status"),
                             "kind": by_reason(reflection, "kind")}
    if w.realign.enabled:
        out["realign"] = {**rt.get("realign", {}), "rows": int(realign.get("rows", 0)),
                          "status": by_reason(realign, "status"), "reason": by_reason(realign, "reason")}
        if category:  # classifier: teacher
            out["realign"]["category_by"] = by_reason(category, "by")
    return out


def build(cfg: Job, stats: dict, inputs: list[dict], *, beam_options: dict, started: str,
          finished: str, wall_s: float, reports: dict | None = None, runtime: dict | None = None) -> dict:
    counts = summarize(stats)
    acc = check_accounting(counts)
    stages = counts.pop("stages")
    for s in stages.values():
        if "model_s" in s:  # a model stage is busy while its model runs, not only in its own DoFns
            s["busy_s"] = round(s.get("busy_s", 0) + s["model_s"], 3)
        busy = s.get("busy_s", 0)
        rows = s.get("rows", s.get("records", 0))
        if busy and rows:
            s["rows_per_busy_s"] = round(rows / busy, 1)
    return {
        "manifest_version": MANIFEST_VERSION,
        "schema_version": SCHEMA_VERSION,
        "job": to_dict(cfg),
        "seed": cfg.seed,
        "versions": package_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine(),
                     "python_executable": sys.executable},
        "beam_options": beam_options,
        "inputs": inputs,
        "counts": counts,
        "accounting": acc,
        "stages": stages,
        "near_dedup": near_dedup_report(cfg, stages, reports or {}),
        **embed_cluster_report(cfg, stages, reports or {}, runtime or {}),
        "score": score_report(cfg, stages, runtime or {}),
        "rds": targeted_report("rds", cfg.score.rds, stages, runtime or {}),
        "less": targeted_report("less", cfg.score.less, stages, runtime or {}),
        "rewrite": rewrite_report(cfg, stages, runtime or {}),
        "degradation": degradation_report(cfg, stages, runtime or {}),
        "select": (reports or {}).get("select"),
        "timing": {"started": started, "finished": finished, "wall_s": round(wall_s, 3)},
    }
