"""``curate evaluate``: which selection recovers a compressed model best, at one budget.

From one finished, scored run: a held-out split that no policy may select (seeded, stratified by
source), then for each policy its selection of ``budget`` rows from the rest, LoRA recovery of
the same compressed model on it (``curate.recover``) for each seed, and on the held-out rows:
the response-token NLL (overall and per source), the share of the dense-to-compressed gap that
recovery closed, and KL(dense || recovered). Seeds are paired: at a given seed every policy's
recovery starts from the same LoRA initialisation and walks its rows in an order fixed by the
seed and the row ids, so the policies differ only in their rows. ``random`` draws a new selection
at each seed (it is the baseline); the other policies' selections do not depend on the seed.

Each policy's difference to random is the mean over seeds of (its NLL - random's NLL) on the
held-out rows, with a paired bootstrap confidence interval over held-out rows. Outputs in
``RUN/eval/`` (or ``--out``): ``results.parquet`` (one row per policy and seed),
``heldout.parquet`` (one row per held-out row, model and seed), ``summary.json``, and a table on
stdout; ``curate report`` adds them to ``report.html``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from curate.errors import CurateError

log = logging.getLogger("curate")


class EvaluateError(CurateError):
    pass


@dataclass(frozen=True)
class EvaluateSettings:
    compressed: str
    budget: int
    policies: tuple = ("random", "superfiltering", "cluster_balanced", "paser")
    params: dict = field(default_factory=dict)  # policy -> parameters
    seeds: tuple = (0, 1, 2)
    heldout: int = 48  # held-out rows (split over sources in proportion)
    dense: str | None = None  # default: the compressed model card's base model
    recover: dict = field(default_factory=dict)  # RecoverSettings fields (steps, lr, ...)
    bootstrap: int = 2000


def heldout_split(ids: list[str], sources: list[str], n: int, seed: int) -> set[str]:
    """``n`` ids, shared among sources in proportion to their size (largest remainder), each
    source's taken by a seeded hash rank: the same split for the same ids and seed."""
    from curate.cluster import sample_rank
    from curate.select.quotas import allocate

    by_source: dict[str, list[str]] = {}
    for i, s in zip(ids, sources):
        by_source.setdefault(s, []).append(i)
    sizes = {s: len(v) for s, v in by_source.items()}
    quota = allocate(min(n, len(ids) // 2), sizes, sizes)
    out = set()
    for s, members in by_source.items():
        out.update(sorted(members, key=lambda i: sample_rank(seed, i))[:quota[s]])
    return out


def bootstrap_ci(diffs: np.ndarray, n: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` (per held-out row) over resampled rows."""
    diffs = np.asarray(diffs, dtype=np.float64)
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(n, len(diffs)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _rows_of(table, ids: list[str]) -> list[dict]:
    by_id = {r["id"]: r for r in table.select(["id", "source", "prompt", "response", "messages"]).to_pylist()}
    return [by_id[i] for i in ids]


def _selection(policy_name: str, params: dict, pool, budget: int, seed: int, folder: str, texts_by_id: dict):
    from curate import runs
    from curate.select import Budget, make

    policy = make(policy_name, params)
    ids = pool.column("id").to_pylist()
    emb = runs.embeddings(folder, ids) if policy.wants_embeddings() else None
    texts = [texts_by_id[i] for i in ids] if policy.wants_text() else None
    return policy.run(pool, Budget(rows=budget), seed, emb, texts=texts).selected


def evaluate(folder: str, s: EvaluateSettings, out: str | None = None, progress=None) -> dict:
    """Run the comparison (see the module docstring); returns the summary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate import lm_data, runs
    from curate.models import load_causal_lm
    from curate.recover import RecoverSettings, lora_model, train
    from curate.select.features import pool_of

    man = runs.manifest(folder)
    table = runs.annotated(folder)
    pool = pool_of(table)
    ids, sources = pool.column("id").to_pylist(), pool.column("source").to_pylist()
    run_seed = man.get("seed", 0)
    held = heldout_split(ids, sources, s.heldout, run_seed)
    selectable = pool.filter(pc.invert(pc.is_in(pool.column("id"), pa.array(sorted(held)))))
    if selectable.num_rows < s.budget:
        raise EvaluateError(f"evaluate: the budget ({s.budget}) exceeds the selectable rows ({selectable.num_rows})")
    texts_by_id = {r["id"]: r["prompt"] + "\n" + r["response"] for r in table.select(["id", "prompt", "response"]).to_pylist()}
    held_ids = sorted(held)
    held_rows = _rows_of(table, held_ids)
    card = os.path.join(s.compressed, "card.json")
    dense_name = s.dense
    if dense_name is None and os.path.isfile(card):
        with open(card, encoding="utf-8") as fh:
            dense_name = json.load(fh).get("base_model")
    dense, tok = load_causal_lm(dense_name, "cpu", "float32")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rs = RecoverSettings(**{k: v for k, v in s.recover.items() if k != "seed"})
    examples = [lm_data.encode(r, tok, rs.cutoff) for r in held_rows]
    nll_dense = np.array(lm_data.response_nll(dense, examples, pad))
    compressed, _ = load_causal_lm(s.compressed, "cpu", "float32")
    base = lm_data.compare(dense, compressed, examples, pad)
    nll_comp = np.array([b["nll_other"] for b in base])
    del compressed

    selections = {}
    for name in s.policies:
        for seed in s.seeds:
            if name == "random" or seed == s.seeds[0]:
                selections[(name, seed)] = _selection(name, s.params.get(name, {}), selectable, s.budget,
                                                      seed if name == "random" else run_seed, folder, texts_by_id)
            else:
                selections[(name, seed)] = selections[(name, s.seeds[0])]
    per_row = {("dense", None): nll_dense, ("compressed", None): nll_comp}
    kl_rows = {}
    results = []
    total = len(s.policies) * len(s.seeds)
    done = 0
    for seed in s.seeds:
        for name in s.policies:
            chosen = selections[(name, seed)]
            t0 = time.perf_counter()
            model, _ = load_causal_lm(s.compressed, "cpu", "float32")
            model = lora_model(model, RecoverSettings(**{**asdict(rs), "seed": seed}))
            rep = train(model, tok, _rows_of(table, chosen), RecoverSettings(**{**asdict(rs), "seed": seed}))
            cmp = lm_data.compare(dense, model, examples, pad)
            nll = np.array([c["nll_other"] for c in cmp])
            kl = np.array([c["kl"] for c in cmp])
            per_row[(name, seed)], kl_rows[(name, seed)] = nll, kl
            ok = np.isfinite(nll) & np.isfinite(nll_dense) & np.isfinite(nll_comp)
            gap = float(np.mean(nll_comp[ok]) - np.mean(nll_dense[ok]))
            closed = float((np.mean(nll_comp[ok]) - np.mean(nll[ok])) / gap) if gap > 0 else math.nan
            by_source = {}
            for src in sorted(set(r["source"] for r in held_rows)):
                m = ok & np.array([r["source"] == src for r in held_rows])
                by_source[src] = float(np.mean(nll[m])) if m.any() else math.nan
            results.append({"policy": name, "seed": seed, "rows": len(chosen), "selected_ids": list(chosen),
                            "steps": rep["steps"],
                            "train_loss_first": rep["loss"][0], "train_loss_last": rep["loss"][-1],
                            "heldout_nll": float(np.mean(nll[ok])), "gap_closed": closed,
                            "kl_dense": float(np.mean(kl[ok])), "nll_by_source": json.dumps(by_source),
                            "seconds": round(time.perf_counter() - t0, 1)})
            done += 1
            if progress is not None:
                progress(done, total, results[-1])
    ok_all = np.isfinite(nll_dense) & np.isfinite(nll_comp)
    for key, v in per_row.items():
        if key[0] not in ("dense", "compressed"):
            ok_all &= np.isfinite(v)
    summary = {"run": os.path.abspath(folder), "settings": {**asdict(s), "recover": asdict(rs)},
               "heldout_rows": len(held_ids), "selectable_rows": selectable.num_rows,
               "nll_dense": float(np.mean(nll_dense[ok_all])), "nll_compressed": float(np.mean(nll_comp[ok_all])),
               "kl_compressed": float(np.mean([b["kl"] for b, k in zip(base, ok_all) if k])),
               "policies": {}}
    for name in s.policies:
        rows = [r for r in results if r["policy"] == name]
        entry = {"heldout_nll": float(np.mean([r["heldout_nll"] for r in rows])),
                 "gap_closed": float(np.mean([r["gap_closed"] for r in rows])),
                 "kl_dense": float(np.mean([r["kl_dense"] for r in rows])),
                 "seeds": [r["seed"] for r in rows]}
        if name != "random" and "random" in s.policies:
            diffs = np.mean([per_row[(name, sd)] - per_row[("random", sd)] for sd in s.seeds], axis=0)
            lo, hi = bootstrap_ci(diffs[ok_all], s.bootstrap, run_seed)
            entry.update(vs_random_nll=float(np.mean(diffs[ok_all])), vs_random_ci95=[lo, hi])
        summary["policies"][name] = entry
    default = os.path.join(folder, "eval")
    out = out or default
    _write(out, results, held_ids, held_rows, per_row, kl_rows, summary)
    summary["output"] = os.path.abspath(out)
    if os.path.abspath(out) == os.path.abspath(default):  # the run's report shows its own evaluation
        from curate.report import write_report

        try:
            write_report(folder)
        except Exception as exc:  # noqa: BLE001 - the results are written; the report is a view of them
            log.error("report.html not updated (%s); `curate report %s` retries it", exc, folder)
    return summary


def _write(out: str, results, held_ids, held_rows, per_row, kl_rows, summary) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pq.write_table(pa.Table.from_pylist(results), os.path.join(tmp, "results.parquet"))
    rows = []
    for (name, seed), nll in per_row.items():
        kl = kl_rows.get((name, seed))
        for k, rid in enumerate(held_ids):
            rows.append({"id": rid, "source": held_rows[k]["source"], "model": name, "seed": seed,
                         "nll": float(nll[k]), "kl_dense": None if kl is None else float(kl[k])})
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(tmp, "heldout.parquet"))
    with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def table_text(summary: dict) -> str:
    """The comparison as a plain-text table."""
    lines = [f"held-out rows {summary['heldout_rows']}: dense NLL {summary['nll_dense']:.4f}, "
             f"compressed {summary['nll_compressed']:.4f} (KL to dense {summary['kl_compressed']:.4f})",
             f"{'policy':<18} {'NLL':>8} {'gap closed':>11} {'KL dense':>9} {'vs random (95% CI)':>28}"]
    for name, e in summary["policies"].items():
        vs = ""
        if "vs_random_nll" in e:
            lo, hi = e["vs_random_ci95"]
            vs = f"{e['vs_random_nll']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        lines.append(f"{name:<18} {e['heldout_nll']:>8.4f} {e['gap_closed']:>10.1%} {e['kl_dense']:>9.4f} {vs:>28}")
    return "\n".join(lines)
