"""``curate evaluate``: which selection recovers a compressed model best, at one budget.

From one finished, scored run: evaluation sets (a held-out split of the run that no policy may
select, seeded and stratified by source, and the user's own sets given as ``--eval NAME=PATH``;
pool rows that also occur in a user's set, exactly or as near duplicates, are removed from the
pool before any selection and counted), then for each policy its selection of ``budget`` rows
from the rest, recovery of the same compressed model on it (``curate.recover``, objective
``sft``, ``kd`` or ``sft+kd``) for each seed, and on every evaluation set: the response NLL,
KL(dense || recovered), the share of the compression gap closed in each, and the flip rate (share
of response positions where the recovered model's greedy next token differs from the dense
model's). The NLL is reported per row (each row's mean over its response tokens, averaged over
rows) and per token (``*_tok``: rows weighted by their response tokens, the NLL whose exponential
is perplexity); the per-row mean lets a few short rows with a high NLL decide a comparison. Seeds are paired: at a given seed every policy's recovery starts from the same LoRA
initialisation and walks its rows in an order fixed by the seed and the row ids, so the policies
differ only in their rows. ``random`` draws a new selection at each seed; the other policies'
selections do not depend on the seed.

Baselines beside the policies: no recovery (the compressed model), ``random``, for each policy a
random selection of the same token count (``random_tokens:POLICY``: a policy that wins by picking
longer rows does not beat it), and the whole pool (``pool``) when one run of the steps covers it.

Each policy's difference to random on a set is the mean over paired seeds of (its NLL - random's
NLL), with a bootstrap interval that resamples seeds and rows (hierarchical), the seeds where it
won, and the smallest difference the run could detect (2.8 bootstrap standard errors: 5% two-sided,
80% power), so a tie reads as a tie; the same per token (``vs_random_tok``). Outputs in ``RUN/eval/`` (or ``--out``): ``results.parquet``
(one row per policy, seed and set), ``heldout.parquet`` (one row per evaluation row, set, model and
seed), ``summary.json`` and a table on stdout; ``curate report`` adds them to ``report.html``.
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
HELDOUT = "heldout"
TOKENS_PREFIX = "random_tokens:"
POOL = "pool"


class EvaluateError(CurateError):
    pass


@dataclass(frozen=True)
class EvaluateSettings:
    compressed: str
    budget: int
    policies: tuple = ("random", "superfiltering", "cluster_balanced", "paser")
    params: dict = field(default_factory=dict)  # policy -> parameters
    seeds: tuple = (0, 1, 2)
    heldout: int = 48  # held-out rows (split over sources in proportion); 0: the user's sets only
    dense: str | None = None  # default: the compressed model card's base model
    recover: dict = field(default_factory=dict)  # RecoverSettings fields (steps, lr, objective, ...)
    bootstrap: int = 2000
    evals: tuple = ()  # (name, path) pairs: the user's own evaluation sets
    length_matched: tuple | None = None  # policies given a random baseline of their token count (None: all)
    whole_pool: bool = True  # also recover on the whole pool when the steps cover it once
    near_threshold: float = 0.7  # MinHash Jaccard at which a pool row counts as an evaluation row's twin


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


def hierarchical_bootstrap(diffs: np.ndarray, n: int, seed: int, level: float = 0.95) -> dict:
    """``diffs`` is [seeds, rows] of paired differences. Each resample draws seeds with
    replacement, then rows with replacement, and takes the mean: the interval accounts for the
    spread between seeds (training noise) and between rows (which rows were evaluated). Returns
    the mean, the interval, the bootstrap standard error and the minimum detectable difference
    (2.8 standard errors: a true difference that size is found at 5% two-sided with 80% power)."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[:, np.isfinite(d).all(axis=0)]
    n_seeds, n_rows = d.shape
    if n_rows < 2:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "se": math.nan, "mde": math.nan}
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    chunk = max(1, 4_000_000 // max(n_seeds * n_rows, 1))
    for lo in range(0, n, chunk):
        k = min(chunk, n - lo)
        si = rng.integers(0, n_seeds, size=(k, n_seeds))
        ri = rng.integers(0, n_rows, size=(k, n_rows))
        means[lo:lo + k] = d[si[:, :, None], ri[:, None, :]].mean(axis=(1, 2))
    ci = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    se = float(np.std(means, ddof=1))
    return {"mean": float(d.mean()), "ci95": [float(ci[0]), float(ci[1])], "se": se, "mde": 2.8 * se}


def overlap(pool_rows: list[dict], eval_rows: list[dict], threshold: float = 0.7,
            num_perm: int = 128, bands: int = 16) -> dict[str, str]:
    """Pool ids whose row also occurs in ``eval_rows``: ``exact`` (the same normalized prompt and
    response, or the same normalized prompt) or ``near`` (MinHash Jaccard of prompt + response at
    least ``threshold``, found through LSH bands and then verified). A pool row a model trained on
    would make its evaluation a test of memory, not of recovery."""
    from curate.dedup.exact import dedup_key
    from curate.dedup.minhash import EMPTY, signatures
    from curate.records import normalize_text

    out: dict[str, str] = {}
    if not pool_rows or not eval_rows:
        return out
    keys = {dedup_key(r["prompt"], r["response"], "") for r in eval_rows}
    prompts = {normalize_text(r["prompt"]) for r in eval_rows if normalize_text(r["prompt"])}
    for r in pool_rows:
        if dedup_key(r["prompt"], r["response"], "") in keys or normalize_text(r["prompt"]) in prompts:
            out[r["id"]] = "exact"
    rest = [r for r in pool_rows if r["id"] not in out]
    if not rest:
        return out
    sig_e = signatures([r["prompt"] + "\n" + r["response"] for r in eval_rows], num_perm)
    sig_p = signatures([r["prompt"] + "\n" + r["response"] for r in rest], num_perm)
    width = num_perm // bands
    index: dict[tuple, list[int]] = {}
    for j, sig in enumerate(sig_e):
        if np.all(sig == EMPTY):
            continue
        for b in range(bands):
            index.setdefault((b, sig[b * width:(b + 1) * width].tobytes()), []).append(j)
    for i, sig in enumerate(sig_p):
        if np.all(sig == EMPTY):
            continue
        seen = set()
        for b in range(bands):
            for j in index.get((b, sig[b * width:(b + 1) * width].tobytes()), ()):
                if j not in seen:
                    seen.add(j)
                    if float(np.mean(sig == sig_e[j])) >= threshold:
                        out[rest[i]["id"]] = "near"
                        break
            if rest[i]["id"] in out:
                break
    return out


def _rows_by_id(table) -> dict[str, dict]:
    return {r["id"]: r for r in table.select(["id", "source", "prompt", "response", "messages"]).to_pylist()}


def policy_of(entry: str) -> tuple[str, str]:
    """(label, policy name) of a ``--policies`` entry: ``NAME`` or ``LABEL=NAME`` (the same policy
    twice with other parameters, e.g. ``rds=targeted,less=targeted``; ``--param`` keys use the label)."""
    label, sep, name = entry.partition("=")
    return (label, name) if sep else (entry, entry)


def _selection(policy_name: str, params: dict, pool, budget, seed: int, folder: str, texts_by_id: dict):
    from curate import runs
    from curate.select import make

    policy = make(policy_of(policy_name)[1], params)
    ids = pool.column("id").to_pylist()
    emb = runs.embeddings(folder, ids) if policy.wants_embeddings() else None
    texts = [texts_by_id[i] for i in ids] if policy.wants_text() else None
    return policy.run(pool, budget, seed, emb, texts=texts).selected


def plan_selections(s: EvaluateSettings, selectable, folder: str, texts_by_id: dict, run_seed: int,
                    steps_rows: int | None) -> tuple[list[str], dict]:
    """(model names in table order, {(name, seed): ids}): the policies, their length-matched
    random baselines and the whole pool (see the module docstring)."""
    import pyarrow.compute as pc

    from curate.select import Budget

    tokens_of = dict(zip(selectable.column("id").to_pylist(), selectable.column("approx_tokens").to_pylist()))
    labels = [policy_of(p)[0] for p in s.policies]
    if len(set(labels)) != len(labels):
        raise EvaluateError(f"evaluate: policy labels must be distinct ({', '.join(labels)}); use LABEL=POLICY")
    selections, names = {}, list(labels)
    for entry, name in zip(s.policies, labels):
        for seed in s.seeds:
            seeded = policy_of(entry)[1] == "random"  # random draws anew per seed; the others are fixed
            if seeded or seed == s.seeds[0]:
                selections[(name, seed)] = _selection(entry, s.params.get(name, {}), selectable,
                                                      Budget(rows=s.budget), seed if seeded else run_seed,
                                                      folder, texts_by_id)
            else:
                selections[(name, seed)] = selections[(name, s.seeds[0])]
    matched = [p for p in labels if p != "random"] if s.length_matched is None else list(s.length_matched)
    for name in matched:
        if name not in labels or name == "random":
            raise EvaluateError(f"evaluate: length-matched baseline for {name!r}, which is not among the policies")
        base = TOKENS_PREFIX + name
        names.append(base)
        for seed in s.seeds:
            tokens = int(sum(tokens_of[i] for i in selections[(name, seed)]))
            selections[(base, seed)] = _selection("random", {}, selectable, Budget(tokens=max(tokens, 1)), seed,
                                                  folder, texts_by_id)
    if s.whole_pool and steps_rows is not None and selectable.num_rows <= steps_rows:
        names.append(POOL)
        everything = sorted(pc.unique(selectable.column("id")).to_pylist())
        for seed in s.seeds:
            selections[(POOL, seed)] = everything
    return names, selections


def token_mean(values: np.ndarray, tokens: np.ndarray, ok: np.ndarray) -> float:
    """The mean over response tokens (each row weighted by its response tokens): the NLL whose
    exponential is perplexity, as the compression literature reports it. The plain mean over rows
    gives a row of 3 tokens the weight of one of 120: a few short rows with a high NLL (short
    factual answers) then decide the comparison and widen its interval."""
    w = tokens[ok]
    return float((values[ok] * w).sum() / w.sum()) if ok.any() and w.sum() > 0 else math.nan


def _set_metrics(nll, kl, flip, base: dict, ok: np.ndarray, tokens: np.ndarray) -> dict:
    """Means over the usable rows (and over their tokens), and the gap closed against the compressed model."""
    m_nll, m_kl, m_flip = (float(np.mean(v[ok])) if ok.any() else math.nan for v in (nll, kl, flip))
    gap = base["nll_compressed"] - base["nll_dense"]
    closed = (base["nll_compressed"] - m_nll) / gap if gap > 0 else math.nan
    closed_kl = (base["kl_compressed"] - m_kl) / base["kl_compressed"] if base["kl_compressed"] > 0 else math.nan
    m_tok = token_mean(nll, tokens, ok)
    gap_tok = base["nll_tok_compressed"] - base["nll_tok_dense"]
    closed_tok = (base["nll_tok_compressed"] - m_tok) / gap_tok if gap_tok > 0 else math.nan
    return {"nll": m_nll, "kl_dense": m_kl, "flip": m_flip, "gap_closed": closed, "gap_closed_kl": closed_kl,
            "nll_tok": m_tok, "gap_closed_tok": closed_tok}


def evaluate(folder: str, s: EvaluateSettings, out: str | None = None, progress=None) -> dict:
    """Run the comparison (see the module docstring); returns the summary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate import lm_data, runs
    from curate.models import load_causal_lm
    from curate.recover import RecoverSettings, dense_model_of, lora_model, train
    from curate.select.features import pool_of

    if s.heldout <= 0 and not s.evals:
        raise EvaluateError("evaluate: no evaluation set: give --heldout N or --eval NAME=PATH")
    names_given = [n for n, _ in s.evals]
    if len(set(names_given)) != len(names_given) or HELDOUT in names_given and s.heldout > 0:
        raise EvaluateError(f"evaluate: evaluation set names must be distinct (and not {HELDOUT!r} beside --heldout)")
    rs = RecoverSettings(**{k: v for k, v in s.recover.items() if k != "seed"})
    man = runs.manifest(folder)
    table = runs.annotated(folder)
    pool = pool_of(table)
    ids, sources = pool.column("id").to_pylist(), pool.column("source").to_pylist()
    run_seed = man.get("seed", 0)
    held = heldout_split(ids, sources, s.heldout, run_seed) if s.heldout > 0 else set()
    by_id = _rows_by_id(table)  # read once: every recovery takes its rows from here
    pool_rows = [by_id[i] for i in ids if i not in held]
    sets: list[tuple[str, list[dict]]] = [(HELDOUT, [by_id[i] for i in sorted(held)])] if held else []
    contaminated: dict[str, str] = {}
    removed: dict[str, dict] = {}
    for name, path in s.evals:
        rows = runs.read_rows(path)
        if not rows:
            raise EvaluateError(f"evaluate: --eval {name}={path}: no rows could be read")
        hit = overlap([r for r in pool_rows if r["id"] not in contaminated], rows, s.near_threshold)
        contaminated.update(hit)
        removed[name] = {"exact": sum(v == "exact" for v in hit.values()),
                         "near": sum(v == "near" for v in hit.values())}
        sets.append((name, [{"id": r.get("id") or f"{name}:{k}", "source": r.get("source") or name,
                             "prompt": r["prompt"], "response": r["response"], "messages": r.get("messages")}
                            for k, r in enumerate(rows)]))
        log.info("evaluation set %s: %d rows; %d pool rows removed as exact and %d as near duplicates of them",
                 name, len(rows), removed[name]["exact"], removed[name]["near"])
    excluded = sorted(held | set(contaminated))
    selectable = pool.filter(pc.invert(pc.is_in(pool.column("id"), pa.array(excluded, pa.string()))))
    if selectable.num_rows < s.budget:
        raise EvaluateError(f"evaluate: the budget ({s.budget}) exceeds the selectable rows ({selectable.num_rows})")
    texts_by_id = {i: r["prompt"] + "\n" + r["response"] for i, r in by_id.items()}

    dense_name = dense_model_of(s.compressed, s.dense)
    dense, tok = load_causal_lm(dense_name, "cpu", "float32")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    examples = {name: [lm_data.encode(r, tok, rs.cutoff) for r in rows] for name, rows in sets}
    usable = {name: np.array([lm_data.usable(e) for e in ex], dtype=bool) for name, ex in examples.items()}
    tokens = {name: np.array([e.n_targets for e in ex], dtype=np.float64) for name, ex in examples.items()}
    for name, ok in usable.items():
        if not ok.any():
            raise EvaluateError(f"evaluate: set {name!r} has no row with a response inside the cutoff ({rs.cutoff})")
    compressed, _ = load_causal_lm(s.compressed, "cpu", "float32")
    per_row: dict[tuple, dict] = {}  # (set, model, seed) -> {"nll", "kl", "flip"} arrays
    base: dict[str, dict] = {}
    for name, ex in examples.items():
        cmp = lm_data.compare(dense, compressed, ex, pad)
        dn = np.array([c["nll_dense"] for c in cmp])
        arr = {k: np.array([c[src] for c in cmp]) for k, src in (("nll", "nll_other"), ("kl", "kl"), ("flip", "flip"))}
        per_row[(name, "dense", None)] = {"nll": dn, "kl": np.zeros_like(dn), "flip": np.zeros_like(dn)}
        per_row[(name, "none", None)] = arr
        ok = usable[name]
        base[name] = {"nll_dense": float(np.mean(dn[ok])), "nll_compressed": float(np.mean(arr["nll"][ok])),
                      "nll_tok_dense": token_mean(dn, tokens[name], ok),
                      "nll_tok_compressed": token_mean(arr["nll"], tokens[name], ok),
                      "kl_compressed": float(np.mean(arr["kl"][ok])), "flip_compressed": float(np.mean(arr["flip"][ok])),
                      "rows": int(ok.sum()), "rows_unusable": int((~ok).sum())}
    del compressed

    steps_rows = rs.steps * rs.batch_size if rs.steps is not None else None
    names, selections = plan_selections(s, selectable, folder, texts_by_id, run_seed, steps_rows)
    tokens_of = dict(zip(selectable.column("id").to_pylist(), selectable.column("approx_tokens").to_pylist()))
    teacher = dense if rs.objective != "sft" else None
    sources = {name: np.array([r["source"] for r in rows]) for name, rows in sets}
    results, total, done = [], len(names) * len(s.seeds), 0
    for seed in s.seeds:
        for name in names:
            chosen = selections[(name, seed)]
            t0 = time.perf_counter()
            at_seed = RecoverSettings(**{**asdict(rs), "seed": seed})
            model, _ = load_causal_lm(s.compressed, "cpu", "float32")
            model = lora_model(model, at_seed)
            rep = train(model, tok, [by_id[i] for i in chosen], at_seed, teacher=teacher)
            train_s = time.perf_counter() - t0
            for set_name, ex in examples.items():
                cmp = lm_data.compare(dense, model, ex, pad)
                arr = {"nll": np.array([c["nll_other"] for c in cmp]), "kl": np.array([c["kl"] for c in cmp]),
                       "flip": np.array([c["flip"] for c in cmp])}
                per_row[(set_name, name, seed)] = arr
                ok = usable[set_name]
                met = _set_metrics(arr["nll"], arr["kl"], arr["flip"], base[set_name], ok, tokens[set_name])
                srcs = sources[set_name]
                by_source = {src: float(np.mean(arr["nll"][ok & (srcs == src)])) for src in sorted(set(srcs))
                             if (ok & (srcs == src)).any()}
                results.append({"policy": name, "seed": seed, "set": set_name, "rows": len(chosen),
                                "tokens": int(sum(tokens_of[i] for i in chosen)), "selected_ids": list(chosen),
                                "objective": rs.objective, "steps": rep["steps"],
                                "train_loss_first": rep["loss"][0], "train_loss_last": rep["loss"][-1],
                                **met, "nll_by_source": json.dumps(by_source),
                                "train_seconds": round(train_s, 1), "seconds_per_step": rep["seconds_per_step"]})
            done += 1
            if progress is not None:
                progress(done, total, results[-len(examples)])
            del model
    summary = _summary(folder, s, rs, sets, base, names, results, per_row, usable, removed, selectable.num_rows,
                       run_seed, tokens)
    default = os.path.join(folder, "eval")
    out = out or default
    _write(out, results, sets, per_row, summary, tokens)
    summary["output"] = os.path.abspath(out)
    if os.path.abspath(out) == os.path.abspath(default):  # the run's report shows its own evaluation
        from curate.report import write_report

        try:
            write_report(folder)
        except Exception as exc:  # noqa: BLE001 - the results are written; the report is a view of them
            log.error("report.html not updated (%s); `curate report %s` retries it", exc, folder)
    return summary


def _summary(folder, s, rs, sets, base, names, results, per_row, usable, removed, n_selectable, run_seed,
             tokens) -> dict:
    """Per set and per model: means over seeds; against random: hierarchical bootstrap, wins, MDE,
    for the NLL per row and per token (``*_tok``: rows weighted by their response tokens)."""
    out_sets = {}
    for set_name, rows in sets:
        ok = usable[set_name]
        weight = tokens[set_name][ok] / tokens[set_name][ok].mean() if ok.any() else tokens[set_name][ok]
        entry = {**base[set_name], "models": {}}
        for name in names:
            rs_ = [r for r in results if r["policy"] == name and r["set"] == set_name]
            e = {k: float(np.mean([r[k] for r in rs_]))
                 for k in ("nll", "kl_dense", "flip", "gap_closed", "gap_closed_kl", "nll_tok", "gap_closed_tok")}
            e.update(seeds=[r["seed"] for r in rs_], rows_selected=float(np.mean([r["rows"] for r in rs_])),
                     tokens_selected=float(np.mean([r["tokens"] for r in rs_])))
            for ref in ("random", TOKENS_PREFIX + name):
                if ref == name or ref not in names:
                    continue
                diffs = np.stack([per_row[(set_name, name, sd)]["nll"] - per_row[(set_name, ref, sd)]["nll"]
                                  for sd in s.seeds])[:, ok]
                boot = hierarchical_bootstrap(diffs, s.bootstrap, run_seed)
                per_seed = diffs.mean(axis=1)
                tag = "vs_random" if ref == "random" else "vs_length_matched"
                e[tag] = {**boot, "wins": int((per_seed < 0).sum()), "seeds": len(s.seeds)}
                # per token: the same paired differences, each row weighted by its response tokens
                weighted = diffs * weight[None, :]
                boot_tok = hierarchical_bootstrap(weighted, s.bootstrap, run_seed)
                e[tag + "_tok"] = {**boot_tok, "wins": int((weighted.mean(axis=1) < 0).sum()), "seeds": len(s.seeds)}
            entry["models"][name] = e
        srcs = sorted({r["source"] for r in rows})
        entry["sources"] = srcs
        out_sets[set_name] = entry
    macro = {}
    for name in names:
        by_set = [out_sets[n]["models"][name]["nll"] for n in out_sets]
        by_source = []
        for r in results:
            if r["policy"] == name:
                by_source += list(json.loads(r["nll_by_source"]).values())
        macro[name] = {"nll_sets": float(np.mean(by_set)),
                       "gap_closed_sets": float(np.mean([out_sets[n]["models"][name]["gap_closed"] for n in out_sets])),
                       "nll_sources": float(np.mean(by_source)) if by_source else math.nan}
    first = sets[0][0]
    primary = out_sets[first]
    policies = {}
    for name in names:  # the first set's figures, in the shape report.html and earlier summaries read
        e = primary["models"][name]
        policies[name] = {"heldout_nll": e["nll"], "gap_closed": e["gap_closed"], "kl_dense": e["kl_dense"],
                          "flip": e["flip"], "seeds": e["seeds"]}
        if "vs_random" in e:
            policies[name].update(vs_random_nll=e["vs_random"]["mean"], vs_random_ci95=e["vs_random"]["ci95"],
                                  vs_random_wins=e["vs_random"]["wins"], vs_random_mde=e["vs_random"]["mde"])
    mdes = [e["vs_random"]["mde"] for e in primary["models"].values() if "vs_random" in e]
    return {"run": os.path.abspath(folder), "settings": {**asdict(s), "recover": asdict(rs)},
            "objective": rs.objective, "primary_set": first,
            "heldout_rows": primary["rows"], "selectable_rows": n_selectable,
            "removed_from_pool": removed,
            "nll_dense": primary["nll_dense"], "nll_compressed": primary["nll_compressed"],
            "kl_compressed": primary["kl_compressed"], "flip_compressed": primary["flip_compressed"],
            "mde": float(np.median(mdes)) if mdes else math.nan,
            "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in results])) if results else math.nan,
            "policies": policies, "sets": out_sets, "macro": macro}


def _write(out: str, results, sets, per_row, summary, tokens) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pq.write_table(pa.Table.from_pylist(results), os.path.join(tmp, "results.parquet"))
    rows_by_set = dict(sets)
    rows = []
    for (set_name, name, seed), arr in per_row.items():
        for k, r in enumerate(rows_by_set[set_name]):
            rows.append({"id": r["id"], "set": set_name, "source": r["source"], "model": name, "seed": seed,
                         "nll": float(arr["nll"][k]), "kl_dense": float(arr["kl"][k]), "flip": float(arr["flip"][k]),
                         "tokens": int(tokens[set_name][k])})
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(tmp, "heldout.parquet"))
    with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _ci(v: dict | None) -> str:
    if not v:
        return ""
    lo, hi = v["ci95"]
    return f"{v['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] {v['wins']}/{v['seeds']}"


def table_text(summary: dict) -> str:
    """The comparison as plain-text tables, one per evaluation set, and the macro averages."""
    lines = [f"objective {summary['objective']}; {summary['selectable_rows']} selectable rows; "
             f"{summary['settings']['recover'].get('steps')} steps of {summary['settings']['recover']['batch_size']} rows; "
             f"seconds per step {summary['seconds_per_step']:.2f}"]
    for name, counts in summary.get("removed_from_pool", {}).items():
        lines.append(f"set {name}: removed from the pool {counts['exact']} exact and {counts['near']} near duplicates")
    for set_name, e in summary["sets"].items():
        mdes = [m["vs_random"]["mde"] for m in e["models"].values() if "vs_random" in m]
        mde = f"; smallest detectable NLL difference vs random {np.median(mdes):.4f}" if mdes else ""
        lines += ["", f"[{set_name}] {e['rows']} rows: dense NLL {e['nll_dense']:.4f}, compressed "
                      f"{e['nll_compressed']:.4f} (KL {e['kl_compressed']:.4f}, flip {e['flip_compressed']:.1%}){mde}",
                  f"{'model':<30} {'NLL':>7} {'gap':>7} {'KL':>7} {'KL gap':>7} {'flip':>6} "
                  f"{'NLL - random [95% CI] wins':>36} {'NLL - same-tokens random':>36} "
                  f"{'NLL/token':>9} {'gap':>7} {'NLL/token - random [95% CI] wins':>36}",
                  f"{'none (compressed)':<30} {e['nll_compressed']:>7.4f} {0:>6.1%} {e['kl_compressed']:>7.4f} "
                  f"{0:>6.1%} {e['flip_compressed']:>6.1%} {'':>36} {'':>36} {e.get('nll_tok_compressed', math.nan):>9.4f}"]
        for name, m in e["models"].items():
            lines.append(f"{name:<30} {m['nll']:>7.4f} {m['gap_closed']:>6.1%} {m['kl_dense']:>7.4f} "
                         f"{m['gap_closed_kl']:>6.1%} {m['flip']:>6.1%} {_ci(m.get('vs_random')):>36} "
                         f"{_ci(m.get('vs_length_matched')):>36} {m.get('nll_tok', math.nan):>9.4f} "
                         f"{m.get('gap_closed_tok', math.nan):>6.1%} {_ci(m.get('vs_random_tok')):>36}")
    if len(summary["sets"]) > 1 or any(len(e["sources"]) > 1 for e in summary["sets"].values()):
        lines += ["", "macro averages: NLL over sets, gap closed over sets, NLL over sets' sources"]
        for name, m in summary["macro"].items():
            lines.append(f"{name:<30} {m['nll_sets']:>7.4f} {m['gap_closed_sets']:>6.1%} {m['nll_sources']:>7.4f}")
    return "\n".join(lines)
