"""Per-token figures for an evaluation written before ``curate evaluate`` reported them.

``curate evaluate`` now reports the NLL per token beside the NLL per row (``curate.evaluate``:
``nll_tok``, ``gap_closed_tok``, ``vs_random_tok``). An evaluation folder written before has the
per-row NLLs (``heldout.parquet``) but not the rows' response-token counts; this recomputes them
(the same tokenizer and cutoff, ``curate.lm_data.encode``) from the run's rows and the ``--eval``
files the summary names, then applies the same weighting and the same hierarchical bootstrap
(same resamples, same seed) as ``curate evaluate``. Prints a Markdown table and, per source, the
mean NLL per row (which rows decided the per-row comparison).

``python -m benchmarks.recovery_tokens EVAL_FOLDER [EVAL_FOLDER ...]``
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd


def tokens_of(summary: dict) -> dict[str, int]:
    """id -> response tokens the evaluation scored (within the cutoff), for every evaluation row."""
    from transformers import AutoTokenizer

    from curate import lm_data, runs
    from curate.models import weak_lm_folder
    from curate.recover import dense_model_of

    s = summary["settings"]
    tok = AutoTokenizer.from_pretrained(weak_lm_folder(dense_model_of(s["compressed"], s.get("dense"))))
    cutoff = s["recover"]["cutoff"]
    rows = runs.annotated(summary["run"], ["id", "prompt", "response", "messages"]).to_pylist()
    for entry in s.get("evals") or ():
        path = entry[1] if isinstance(entry, (list, tuple)) else entry.split("=", 1)[1]
        rows += runs.read_rows(path)
    return {r["id"]: lm_data.encode(r, tok, cutoff).n_targets for r in rows}


def per_token(folder: str) -> str:
    from curate.evaluate import hierarchical_bootstrap, token_mean

    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    counts = tokens_of(summary)
    h = pd.read_parquet(os.path.join(folder, "heldout.parquet"))
    run_seed = json.load(open(os.path.join(summary["run"], "manifest.json"))).get("seed", 0)
    out = []
    for set_name in summary["sets"]:
        rows = h[h.set == set_name]
        ids = list(rows[rows.model == "none"].id)
        w = np.array([counts[i] for i in ids], dtype=np.float64)
        nll = {(m, sd): g.set_index("id").nll.loc[ids].to_numpy() for (m, sd), g in
               rows.groupby(["model", rows.seed.fillna(-1)])}
        ok = np.isfinite(nll[("none", -1)]) & (w > 0)
        dense, comp = token_mean(nll[("dense", -1)], w, ok), token_mean(nll[("none", -1)], w, ok)
        weight = w[ok] / w[ok].mean()
        seeds = sorted({sd for m, sd in nll if m == "random"})
        out += [f"Set `{set_name}`: {int(ok.sum())} rows, {int(w[ok].sum())} response tokens; NLL per token: "
                f"dense {dense:.4f}, compressed {comp:.4f}.", "",
                "| model | NLL per token | gap closed | NLL/token − random [95% CI] | seeds won | smallest detectable |",
                "|---|---|---|---|---|---|"]
        for name in summary["sets"][set_name]["models"]:
            per_seed = [token_mean(nll[(name, sd)], w, ok) for sd in seeds]
            m = float(np.mean(per_seed))
            line = f"| {name} | {m:.4f} | {(comp - m) / (comp - dense):.1%} |"
            if name == "random":
                out.append(line + " (baseline) | | |")
                continue
            diffs = np.stack([nll[(name, sd)] - nll[("random", sd)] for sd in seeds])[:, ok] * weight[None, :]
            b = hierarchical_bootstrap(diffs, summary["settings"].get("bootstrap", 2000), run_seed)
            wins = int((diffs.mean(axis=1) < 0).sum())
            out.append(line + f" {b['mean']:+.4f} [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] | {wins}/{len(seeds)} | "
                              f"{b['mde']:.4f} |")
        srcs = sorted(set(rows.source))
        if len(srcs) > 1:
            out += ["", "Mean NLL per row, by source (rows; response tokens): " + ", ".join(
                f"{s} ({int((rows[rows.model == 'none'].source == s).sum())}; "
                f"{int(w[(rows[rows.model == 'none'].source == s).to_numpy()].sum())})" for s in srcs), "",
                "| model | " + " | ".join(srcs) + " |", "|---|" + "---|" * len(srcs)]
            for name in summary["sets"][set_name]["models"]:
                g = rows[rows.model == name].groupby("source").nll.mean()
                out.append(f"| {name} | " + " | ".join(f"{g.get(s, float('nan')):.3f}" for s in srcs) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(f"## {f}\n\n{per_token(f)}")
