"""report.html: one self-contained page (PNG plots embedded) that shows what a run kept and why.

Sections (each a ``<section id=...>``): summary, funnel, policy, scores, targeted (the rows most
like the job's targets), clusters, map, duplicates, evaluation (``curate evaluate``'s results, when
the run has ``eval/``). A section whose data the run does not have says so instead of failing.
The same loaders and plots serve ``notebooks/explore_run.ipynb``.
"""
from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import runs, storage
from curate.schema import rank_columns
from curate.select.features import DEDUP_REASONS

SECTIONS = ("summary", "funnel", "policy", "scores", "targeted", "clusters", "map", "duplicates", "evaluation")
SCORE_COLUMNS = rank_columns()  # declared by the score stages (curate.columns)
MAP_POINTS = 5000


def _figure(width: float, height: float):
    """A matplotlib Figure outside pyplot: no global backend or figure registry, so the report
    works headless and the notebook shows the same objects inline."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def funnel(man: dict) -> list[tuple[str, int]]:
    """Rows left after each step: read, validation, each dedup reason, the policy."""
    c = man["counts"]
    left = c["rows_in"]
    steps = [("rows read", left)]
    left -= sum(c["rejected"].values())
    steps.append(("after validation", left))
    for reason in DEDUP_REASONS:
        if reason in c["dropped"]:
            left -= c["dropped"][reason]
            steps.append((f"after {reason.replace('_', ' ')}", left))
    other = sum(n for r, n in c["dropped"].items() if r not in DEDUP_REASONS)
    steps.append(("selected", left - other))
    return steps


def plot_funnel(man: dict):
    steps = funnel(man)
    fig = _figure(7, 0.5 + 0.45 * len(steps))
    ax = fig.subplots()
    names, values = [s for s, _ in steps][::-1], [v for _, v in steps][::-1]
    ax.barh(names, values, color="#4c72b0")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,}", va="center", fontsize=9)
    ax.set_xlabel("rows")
    ax.set_title("funnel")
    fig.tight_layout()
    return fig


def _candidates(table):
    """Rows that reached the selection (not dropped as a duplicate), as a boolean array."""
    dedup = pc.is_in(table.column("drop_reason"), value_set=pa.array(DEDUP_REASONS, pa.string()))
    return pc.invert(pc.fill_null(dedup, False))


def _selected(table):
    return pc.fill_null(table.column("selected"), False)


def score_table(table, column: str):
    """(selected values, dropped-by-policy values) of a score column among the candidates, finite only.
    Arrow and numpy throughout: a Python object per row costs gigabytes at a million rows."""
    vals = np.asarray(pc.fill_null(table.column(column).cast("double"), np.nan).to_numpy(zero_copy_only=False))
    sel = np.asarray(_selected(table).to_numpy(zero_copy_only=False), dtype=bool)
    cand = np.asarray(_candidates(table).to_numpy(zero_copy_only=False), dtype=bool)
    ok = np.isfinite(vals)
    return vals[sel & ok], vals[cand & ~sel & ok]


def plot_scores(table, columns=None):
    columns = [c for c in (columns or SCORE_COLUMNS) if c in table.column_names
               and pc.sum(pc.is_valid(table.column(c))).as_py()]
    if not columns:
        return None
    fig = _figure(4.2 * len(columns), 3.2)
    axes = fig.subplots(1, len(columns), squeeze=False)
    for ax, col in zip(axes[0], columns):
        kept, dropped = score_table(table, col)
        both = np.concatenate([kept, dropped])
        if not len(both):
            ax.set_title(f"{col}: no finite values")
            continue
        lo, hi = np.percentile(both, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(np.clip(dropped, lo, hi), bins=bins, alpha=0.6, label=f"not selected ({len(dropped):,})",
                color="#c44e52")
        ax.hist(np.clip(kept, lo, hi), bins=bins, alpha=0.6, label=f"selected ({len(kept):,})", color="#55a868")
        if col.startswith("ifd"):
            ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_title(col)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cluster_counts(table) -> list[tuple[int, int, int]]:
    """(cluster, candidate rows, selected rows), largest cluster first."""
    keep = pc.and_(_candidates(table), pc.is_valid(table.column("cluster_id")))
    rows = pa.table({"c": table.column("cluster_id"), "s": _selected(table).cast(pa.int64())}).filter(keep)
    counts = rows.group_by("c").aggregate([("s", "count"), ("s", "sum")])
    got = zip(counts.column("c").to_pylist(), counts.column("s_count").to_pylist(), counts.column("s_sum").to_pylist())
    return sorted(((c, n, s) for c, n, s in got), key=lambda t: (-t[1], t[0]))


def plot_clusters(table):
    counts = cluster_counts(table)
    if not counts:
        return None
    fig = _figure(max(6, min(0.12 * len(counts), 14)), 3.2)
    ax = fig.subplots()
    x = np.arange(len(counts))
    ax.bar(x, [n for _, n, _ in counts], color="#c7c7c7", label="candidates")
    ax.bar(x, [s for _, _, s in counts], color="#55a868", label="selected")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("rows")
    ax.set_title(f"{len(counts)} clusters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def embedding_map(folder: str, table, limit: int = MAP_POINTS, seed: int = 0):
    """(2-D PCA coordinates, selected flags) for up to ``limit`` candidate rows with embeddings."""
    if not runs.has_embeddings(folder):
        return None
    has = pc.fill_null(pc.is_in(table.column("id"), value_set=runs.embedding_ids(folder)), False)
    keep = np.flatnonzero(np.asarray(has.to_numpy(zero_copy_only=False), dtype=bool)).tolist()
    if len(keep) < 3:
        return None
    if len(keep) > limit:
        keep = sorted(np.random.default_rng(seed).choice(keep, limit, replace=False).tolist())
    ids = table.column("id").take(pa.array(keep, pa.int64())).to_pylist()
    sel = _selected(table).take(pa.array(keep, pa.int64())).to_pylist()
    x = runs.embeddings(folder, ids).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, np.array(sel, dtype=bool)


def plot_map(folder: str, table):
    got = embedding_map(folder, table)
    if got is None:
        return None
    xy, sel = got
    fig = _figure(6, 5)
    ax = fig.subplots()
    ax.scatter(xy[~sel, 0], xy[~sel, 1], s=6, c="#c7c7c7", label=f"not selected ({(~sel).sum():,})")
    ax.scatter(xy[sel, 0], xy[sel, 1], s=8, c="#55a868", label=f"selected ({sel.sum():,})")
    ax.set_title("embeddings, first two principal components")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def table_texts(table):
    """``texts(ids) -> {id: prompt + response}`` over a table that holds the text columns."""
    def texts(ids) -> dict[str, str]:
        hit = table.filter(pc.is_in(table.column("id"), pa.array(sorted(set(ids)), pa.string())))
        return {r["id"]: r["prompt"] + "\n" + r["response"] for r in hit.select(["id", "prompt", "response"])
                .to_pylist()}
    return texts


def run_texts(folder: str):
    """``texts(ids)`` read from a run's annotated/ one file at a time, so the report never holds
    every row's text (at a million rows that is gigabytes on the driver)."""
    def texts(ids) -> dict[str, str]:
        out = {}
        for part in runs.parquet_parts(folder, "annotated", ["id", "prompt", "response"]):
            out.update(table_texts(part)(ids))
        return out
    return texts


def duplicate_pairs(table, column: str, limit: int = 5, texts=None) -> list[tuple[str, str, str, str]]:
    """Up to ``limit`` (dropped id, dropped text, kept id, kept text) pairs for a dedup column.
    ``texts``: where the text comes from (default: ``table``'s own prompt and response)."""
    if column not in table.column_names:
        return []
    dup = table.filter(pc.is_valid(table.column(column)))
    if not dup.num_rows:
        return []
    dup = dup.sort_by("id").slice(0, limit).select(["id", column]).to_pylist()
    text = (texts or table_texts(table))([r["id"] for r in dup] + [r[column] for r in dup])
    return [(r["id"], text.get(r["id"], ""), r[column], text.get(r[column], "")) for r in dup]


def top_targeted(table, column: str = "rds_score", limit: int = 10) -> list[dict]:
    """The ``limit`` rows most like the targets (best first; NaN and null left out)."""
    if column not in table.column_names:
        return []
    scored = table.filter(pc.is_valid(table.column(column)))
    scored = scored.filter(pc.invert(pc.is_nan(scored.column(column))))
    if not scored.num_rows:
        return []
    return scored.sort_by([(column, "descending"), ("id", "ascending")]).slice(0, limit).to_pylist()


TEXT_COLUMNS = ("prompt", "response", "messages", "original", "original_prompt", "original_response")
TARGETED = (("less", "LESS"), ("rds", "RDS+"))  # (column prefix, name) of the targeted scores
# what the report reads of every row (text only for the rows it shows, via run_texts)
REPORT_COLUMNS = ("id", "source", "selected", "drop_reason", "cluster_id", "exact_dup_of", "near_dup_of",
                  "semantic_dup_of", *SCORE_COLUMNS,
                  *(f"{prefix}_{part}" for prefix, _ in TARGETED for part in ("score", "subtask")))


def targeted_section(table, texts=None) -> str:
    parts = []
    for prefix, name in TARGETED:
        score, subtask = f"{prefix}_score", f"{prefix}_subtask"
        top = top_targeted(table, score)
        if not top:
            continue
        text = (texts or table_texts(table))([r["id"] for r in top])
        counts = {v["values"]: v["counts"] for v in pc.value_counts(table.column(subtask)).to_pylist()
                  if v["values"] is not None}
        chosen = table.filter(pc.fill_null(table.column("selected"), False)).column(subtask) \
            if "selected" in table.column_names else pa.array([], pa.string())
        picked = {v["values"]: v["counts"] for v in pc.value_counts(chosen).to_pylist() if v["values"] is not None}
        parts.append(f"<h3>{name}</h3><p>Rows most like the targets by {score}, best first; the subtask each "
                     "row matched best.</p>"
                     + _rows([(r["id"], r["source"], r.get(subtask), f"{r[score]:.4f}",
                               "yes" if r.get("selected") else "no", _short(text.get(r["id"], "")))
                              for r in top], ("row", "source", "subtask", score, "selected", "text"))
                     + _rows([(k, n, picked.get(k, 0)) for k, n in sorted(counts.items())],
                             ("subtask", "rows matched best", "of them selected")))
    return "".join(parts) or "<p>No targeted scores: the run had score.rds and score.less off.</p>"


def _png(fig) -> str:
    if fig is None:
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def plot_evaluation(summary: dict):
    """Share of the compression gap each policy's recovery closed (mean over seeds)."""
    names = list(summary["policies"])
    closed = [summary["policies"][n]["gap_closed"] for n in names]
    fig = _figure(7, 0.6 + 0.45 * len(names))
    ax = fig.subplots()
    ax.barh(names[::-1], closed[::-1], color=["#c44e52" if n == "random" else "#4c72b0" for n in names[::-1]])
    for y, v in enumerate(closed[::-1]):
        ax.text(v, y, f" {v:.1%}", va="center", fontsize=9)
    finite = [v for v in closed if v == v]
    ax.set_xlim(min(0.0, *finite) if finite else 0.0, max(0.05, *finite) * 1.2 if finite else 1.0)
    ax.set_xlabel("share of the dense-to-compressed held-out NLL gap closed by recovery")
    ax.set_title("recovery by selection policy")
    fig.tight_layout()
    return fig


def evaluation_section(folder: str) -> str:
    path = storage.join(folder, "eval", "summary.json")
    if not storage.isfile(path):
        return "<p>No evaluation: run <code>curate evaluate</code> on this run to compare policies by recovery.</p>"
    with storage.open_file(path, "r", encoding="utf-8") as fh:
        summary = json.load(fh)
    head = (f"<p>Objective {summary.get('objective', 'sft')}; budget {summary['settings']['budget']} rows, seeds "
            f"{summary['settings']['seeds']}. The plot shows the set {summary.get('primary_set', 'heldout')}.</p>")
    parts = [head, _png(plot_evaluation(summary))]
    for set_name, e in summary.get("sets", {}).items():
        rows = [("none (compressed)", f"{e['nll_compressed']:.4f}", "0.0%", f"{e['kl_compressed']:.4f}",
                 f"{e['flip_compressed']:.1%}", "", "")]
        for name, m in e["models"].items():
            vs = m.get("vs_random")
            text = (f"{vs['mean']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}], {vs['wins']}/{vs['seeds']} seeds"
                    if vs else "baseline")
            rows.append((name, f"{m['nll']:.4f}", f"{m['gap_closed']:.1%}", f"{m['kl_dense']:.4f}", f"{m['flip']:.1%}",
                         text, f"{vs['mde']:.4f}" if vs else ""))
        parts.append(f"<h3>{html.escape(set_name)}: {e['rows']} rows, dense NLL {e['nll_dense']:.4f}</h3>")
        parts.append(_rows(rows, ("model", "NLL", "gap closed", "KL(dense || recovered)", "flip rate",
                                  "NLL - random [95% CI], wins", "smallest detectable")))
    return "".join(parts)


def _rows(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _short(text: str, n: int = 240) -> str:
    return text if len(text) <= n else text[:n] + " ..."


def render(folder: str) -> str:
    man = runs.manifest(folder)
    names = runs.parquet_columns(folder, "annotated")
    table = runs.annotated(folder, [c for c in names if c in REPORT_COLUMNS])  # text: only where shown
    texts = run_texts(folder)
    acc, c = man["accounting"], man["counts"]
    sec = {}
    sec["summary"] = (f"<p>job <b>{html.escape(str(man['job'].get('name')))}</b>, finished {man['timing']['finished']}"
                      f" in {man['timing']['wall_s']:.1f} s: {acc['rows_in']:,} rows in, {acc['selected']:,} selected, "
                      f"{acc['dropped']:,} dropped, {acc['rejected']:,} rejected "
                      f"({'accounting holds' if acc['holds'] else 'ACCOUNTING BROKEN'}).</p>"
                      + _rows([(s, v["rows_in"], v["selected"], sum(v["dropped"].values()),
                                sum(v["rejected"].values())) for s, v in c["by_source"].items()],
                              ("source", "rows in", "selected", "dropped", "rejected")))
    reasons = [("rejected", r, n) for r, n in c["rejected"].items()] + \
              [("dropped", r, n) for r, n in c["dropped"].items()]
    sec["funnel"] = _png(plot_funnel(man)) + _rows(reasons or [("-", "-", 0)], ("outcome", "reason", "rows"))
    sel = man.get("select") or {}
    if sel:
        params = sel.get("params", sel.get("steps"))
        sec["policy"] = (f"<p>policy <b>{html.escape(sel['policy'])}</b>, budget "
                         f"{html.escape(json.dumps(sel['budget']) if sel['budget'] else 'none')}, seed {sel['seed']}: "
                         f"{sel['selected']:,} of {sel['pool']:,} candidates selected.</p>"
                         f"<pre>{html.escape(json.dumps(params, indent=2))}</pre>"
                         + _rows([(r, n) for r, n in sel["dropped"].items()] or [("-", 0)], ("dropped because", "rows")))
    else:
        sec["policy"] = "<p>No policy recorded in the manifest.</p>"
    scores = plot_scores(table)
    sec["scores"] = _png(scores) if scores else "<p>No scores: the run had the score stage off.</p>"
    if "score" in man and man["score"].get("enabled"):
        shares = {k: v for k, v in man["score"].items() if "share" in k}
        sec["scores"] += f"<pre>{html.escape(json.dumps(shares, indent=2))}</pre>"
    sec["targeted"] = targeted_section(table, texts)
    clusters = plot_clusters(table)
    sec["clusters"] = _png(clusters) if clusters else "<p>No clusters: the run had the cluster stage off.</p>"
    emap = plot_map(folder, table)
    sec["map"] = _png(emap) if emap else "<p>No embeddings map: the run had the embed stage off.</p>"
    dups = []
    for column, title in (("exact_dup_of", "exact duplicates"), ("near_dup_of", "near duplicates (MinHash)"),
                          ("semantic_dup_of", "semantic duplicates (SemDeDup)")):
        pairs = duplicate_pairs(table, column, texts=texts)
        body = _rows([(a, _short(at), b, _short(bt)) for a, at, b, bt in pairs],
                     ("dropped row", "text", "kept row", "text")) if pairs else "<p>none in this run</p>"
        dups.append(f"<h3>{title}</h3>{body}")
    sec["duplicates"] = "".join(dups)
    sec["evaluation"] = evaluation_section(folder)
    titles = {"summary": "Summary", "funnel": "Funnel: rows per stage and drop reason", "policy": "Selection policy",
              "scores": "Scores, selected vs not selected", "targeted": "Targeted scores: the top rows",
              "clusters": "Cluster sizes",
              "map": "Embedding map", "duplicates": "Sample duplicate pairs",
              "evaluation": "Recovery by selection policy (curate evaluate)"}
    body = "".join(f'<section id="{s}"><h2>{titles[s]}</h2>{sec[s]}</section>' for s in SECTIONS)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>curate report: "
            f"{html.escape(str(man['job'].get('name')))}</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
            "font-size:13px;vertical-align:top;white-space:pre-wrap}img{max-width:100%}"
            "section{margin-bottom:2em}</style></head><body>"
            f"<h1>curate run report</h1>{body}</body></html>")


def write_report(folder: str, out: str | None = None) -> str:
    path = out or storage.join(folder, "report.html")
    text = render(folder)
    with storage.open_file(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
