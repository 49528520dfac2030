"""The headline: which selection recovers a pruned model best, in three scenarios.

SmolLM2-135M-Instruct is pruned once by one-shot Wanda at 50% (``curate compress``); each scenario
builds a pool of real rows (Alpaca Cherry 5% and GSM8K train from ../shared/data, the NQ sample
from examples/data), scores it with ``curate run`` and compares selections with ``curate
evaluate`` (paired seeds, hierarchical bootstrap against random, the smallest detectable
difference, length-matched random and no-recovery baselines):

- ``general``: 240 Alpaca + 120 GSM8K + 40 NQ; held-out rows follow the mix; policies random,
  superfiltering, mixture (superfiltering within per-source quotas), cluster_balanced (top IFD per
  cluster), paser and top_k on ``degradation_jsd``; under ``sft`` and under ``kd`` (the kd run
  takes random, superfiltering and the degradation policy).
- ``targeted``: 16 GSM8K rows as ``targets:``, a pool of 200 Alpaca + 40 GSM8K (the NQ sample's
  50 rows go to the other scenarios), the
  evaluation set 48 other GSM8K rows (``--eval gsm8k=...``); random, ``targeted`` on ``rds_score``
  and on ``less_score``.
- ``noisy``: the general pool with 30% of its rows made defective from real rows (a response moved
  to another row's instruction, a response cut mid-sentence, a refusal or placeholder, a row
  repeated three times); exact and near dedup on; the evaluation set 60 clean rows of the same
  sources that are not in the pool; the general policies, then the r-IFD fixes.
- ``noisy-replication``: a second noisy pool from other rows, other defects and another clean set,
  on which the failure of IFD ranking and the fixes designed on the first draw are measured once.

Each table leads with the NLL per token (rows weighted by their response tokens) and gives the NLL
per row beside it (``curate.evaluate``; why per token: the recovery guide).

Every scenario prints its table and one JSON line per model; ``--only NAME`` runs one. All data is
written under ``runs/bench-recovery/`` (each evaluation's tables as ``SCENARIO/eval-*.md``) (``--quick``: ``runs/bench-recovery-quick/``, a smoke run of
a few minutes on tiny sizes whose figures say nothing about who wins).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from benchmarks.common import REPO, emit, shared

RUNS = os.path.join(REPO, "runs")
SCENARIOS = ("targeted", "noisy", "noisy-replication", "general")

# The design, fixed from the pilot's seed spread (README "Headline results"), not from who won.
FULL = {"budget": 48, "steps": 6, "batch": 8, "cutoff": 128, "lr": 1e-3, "seeds": "0,1,2,3,4", "heldout": 48,
        "general": (240, 120, 40), "targeted": (200, 40, 16, 48), "noisy_clean_eval": 60}
QUICK = {"budget": 8, "steps": 1, "batch": 4, "cutoff": 96, "lr": 1e-3, "seeds": "0,1", "heldout": 8,
         "general": (16, 8, 4), "targeted": (16, 4, 4, 6), "noisy_clean_eval": 8}
GENERAL_POLICIES = "random,superfiltering,mixture,cluster_balanced,paser,degradation=top_k"
KD_POLICIES = "random,superfiltering,degradation=top_k"


def _alpaca(start: int, n: int) -> list[dict]:
    with open(shared("alpaca_cherry_5pct.json"), encoding="utf-8") as fh:
        return json.load(fh)[start:start + n]


def _gsm(start: int, n: int) -> list[dict]:
    with open(shared("gsm8k_train.json"), encoding="utf-8") as fh:
        return json.load(fh)[start:start + n]


def _nq(start: int, n: int) -> list[dict]:
    with open(os.path.join(REPO, "examples", "data", "nq_sharegpt_sample.json"), encoding="utf-8") as fh:
        return [{"instruction": r["items"][0]["value"], "input": "", "output": r["items"][1]["value"]}
                for r in json.load(fh)[start:start + n]]


def _write(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({k: r.get(k, "") for k in ("instruction", "input", "output")}) + "\n")
    return path


def _curate(*args: str) -> None:
    print("$ curate " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "curate", *args], check=True, cwd=REPO,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _model(out: str, quick: bool) -> str:
    """The pruned model, made once and shared by the scenarios (its calibration rows come from
    Alpaca rows no scenario uses)."""
    model = os.path.join(out, "smollm2-wanda50")
    if not os.path.isfile(os.path.join(model, "card.json")):
        calib = _write(os.path.join(out, "calibration.jsonl"), _alpaca(2800, 64))
        _curate("compress", "--calibration", calib, "--out", model, "--method", "wanda", "--sparsity", "0.5",
                "--calibration-rows", "8" if quick else "32", "--heldout", "8" if quick else "32")
    return model


def defects(rows: list[dict], share: float, seed: int) -> tuple[list[dict], dict]:
    """``rows`` with about ``share`` of them made defective the way real pools are: a response moved
    to another row's instruction, a response cut mid-sentence, a refusal or placeholder response,
    or a row repeated three times (each copy replaces a clean row). Returns (rows, counts by kind)."""
    rng = random.Random(seed)
    rows = [dict(r) for r in rows]
    picked = rng.sample(range(len(rows)), int(round(share * len(rows))))
    kinds = ("swapped", "truncated", "refusal", "swapped", "truncated", "refusal", "repeated")
    counts = dict.fromkeys(kinds, 0)
    refusals = ("I'm sorry, but I can't help with that request.", "N/A", "TODO: write the answer here.",
                "As an AI language model, I cannot answer this question.", "...")
    k = c = 0
    while k < len(picked):
        i, kind = picked[k], kinds[c % len(kinds)]
        c += 1
        if kind == "swapped":
            j = rng.randrange(len(rows))
            rows[i]["output"] = rows[(j if j != i else i + 1) % len(rows)]["output"]
        elif kind == "truncated":
            words = rows[i]["output"].split()
            rows[i]["output"] = " ".join(words[:max(1, int(len(words) * rng.uniform(0.2, 0.5)))])
        elif kind == "refusal":
            rows[i]["output"] = rng.choice(refusals)
        else:  # this row and two copies of it, the copies taking the places of the next two picks
            for copy in picked[k + 1:k + 3]:
                rows[copy] = dict(rows[i])
                counts[kind] += 1
            k += 2
        counts[kind] += 1
        k += 1
    return rows, counts


def _evaluate(out: str, name: str, run: str, model: str, d: dict, policies: str, extra: list[str]) -> dict:
    folder = os.path.join(out, name)
    t0 = time.perf_counter()
    _curate("evaluate", run, "--model", model, "--rows", str(d["budget"]), "--policies", policies,
            "--seeds", d["seeds"], "--steps", str(d["steps"]), "--batch-size", str(d["batch"]),
            "--cutoff", str(d["cutoff"]), "--lr", str(d["lr"]), "--out", folder, *extra)
    with open(os.path.join(folder, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    summary["wall_s"] = time.perf_counter() - t0
    summary["folder"] = folder
    return summary


def _report(scenario: str, summary: dict, d: dict) -> None:
    from curate.evaluate import table_text

    print(f"\n== recovery scenario {scenario} ({summary['objective']}) ==\n{table_text(summary)}\n", flush=True)
    with open(summary["folder"] + ".md", "w", encoding="utf-8") as fh:  # e.g. noisy/eval-sft.md
        fh.write(markdown(summary))
    for set_name, e in summary["sets"].items():
        rnd = e["models"].get("random", {}).get("nll")
        for name, m in e["models"].items():
            vs, lm = m.get("vs_random") or {}, m.get("vs_length_matched") or {}
            emit("recovery", f"{scenario}/{summary['objective']}/{set_name}/{name}", "nll", m["nll"], "random", rnd,
                 n=d["budget"], higher_is_better=False, gap_closed=round(m["gap_closed"], 4),
                 gap_closed_kl=round(m["gap_closed_kl"], 4), kl_dense=round(m["kl_dense"], 4),
                 flip=round(m["flip"], 4), nll_tok=round(m["nll_tok"], 4), gap_closed_tok=round(m["gap_closed_tok"], 4),
                 vs_random_tok=(m.get("vs_random_tok") or {}).get("mean"),
                 vs_random_tok_ci95=(m.get("vs_random_tok") or {}).get("ci95"),
                 wins_tok=(m.get("vs_random_tok") or {}).get("wins"), mde_tok=(m.get("vs_random_tok") or {}).get("mde"),
                 vs_random=vs.get("mean"), vs_random_ci95=vs.get("ci95"),
                 wins=vs.get("wins"), mde=vs.get("mde"), vs_length_matched=lm.get("mean"),
                 vs_length_matched_ci95=lm.get("ci95"), seeds=m["seeds"], steps=d["steps"],
                 rows=e["rows"], nll_dense=round(e["nll_dense"], 4), nll_compressed=round(e["nll_compressed"], 4),
                 seconds_per_step=round(summary["seconds_per_step"], 2))
    emit("recovery", f"{scenario}/{summary['objective']}/wall", "seconds", summary["wall_s"],
         seconds_per_step=round(summary["seconds_per_step"], 2), objective=summary["objective"])


def markdown(summary: dict) -> str:
    """A scenario's tables as Markdown (the README's), one per evaluation set."""
    out = []
    for set_name, e in summary["sets"].items():
        out += [f"Set `{set_name}`: {e['rows']} rows; dense NLL {e['nll_dense']:.4f}, compressed "
                f"{e['nll_compressed']:.4f} (KL {e['kl_compressed']:.4f}, flip rate {e['flip_compressed']:.1%}).", "",
                "| model | NLL per token | gap closed | NLL/token − random [95% CI] | seeds won | smallest detectable | "
                "NLL per row | gap closed | NLL/row − random [95% CI] | seeds won | smallest detectable | "
                "KL gap closed | flip rate | NLL/row − same-tokens random [95% CI] |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                f"| none (compressed) | {e['nll_tok_compressed']:.4f} | 0% | | | | {e['nll_compressed']:.4f} | 0% "
                f"| | | | 0% | {e['flip_compressed']:.1%} | |"]
        for name, m in e["models"].items():
            vs, vt, lm = m.get("vs_random"), m.get("vs_random_tok"), m.get("vs_length_matched")

            def ci(v):
                return f"{v['mean']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if v else ""

            def won(v):
                return (f"{v['wins']}/{v['seeds']}", f"{v['mde']:.4f}") if v else ("", "")
            out.append(f"| {name} | {m['nll_tok']:.4f} | {m['gap_closed_tok']:.1%} | {ci(vt) or '(baseline)'} | "
                       f"{' | '.join(won(vt))} | {m['nll']:.4f} | {m['gap_closed']:.1%} | {ci(vs) or '(baseline)'} | "
                       f"{' | '.join(won(vs))} | {m['gap_closed_kl']:.1%} | {m['flip']:.1%} | {ci(lm)} |")
        out.append("")
    return "\n".join(out)


def _job(out: str, name: str, inputs: list[dict], cutoff: int, model: str, **stages) -> str:
    import yaml

    job = {"name": f"bench-recovery-{name}", "output": os.path.join(out, name, "run"), "seed": 0, "inputs": inputs,
           "dedup": {"semantic": {"enabled": False}},
           "score": {"ifd": {"max_length": 2 * cutoff},
                     "degradation": {"enabled": True, "compressed": model, "cutoff": cutoff}},
           "select": {"policy": "all"}}
    for key, value in stages.items():
        node = job
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    path = os.path.join(out, name, "job.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(job, fh)
    _curate("run", path, "--overwrite")
    return job["output"]


def _general_params(shares: dict) -> list[str]:
    return ["--param", "mixture.shares=" + json.dumps(shares), "--param", "mixture.score=ifd_loss",
            "--param", "mixture.upper=1.0", "--param", "cluster_balanced.score=ifd_loss",
            "--param", "cluster_balanced.upper=1.0", "--param", "degradation.column=degradation_jsd"]


def general(out: str, model: str, d: dict) -> None:
    folder = os.path.join(out, "general")
    os.makedirs(folder, exist_ok=True)
    na, ng, nn = d["general"]
    inputs = [{"source": s, "path": _write(os.path.join(folder, f"{s}.jsonl"), rows)}
              for s, rows in (("alpaca", _alpaca(0, na)), ("gsm8k", _gsm(0, ng)), ("nq", _nq(0, nn)))]
    run = _job(out, "general", inputs, d["cutoff"], model)
    shares = {"alpaca": na, "gsm8k": ng, "nq": nn}
    params = _general_params(shares)
    common = ["--heldout", str(d["heldout"]), "--length-matched", "superfiltering", *params]
    _report("general", _evaluate(out, "general/eval-sft", run, model, d, GENERAL_POLICIES, common), d)
    _report("general", _evaluate(out, "general/eval-kd", run, model, d, KD_POLICIES,
                                 ["--heldout", str(d["heldout"]), "--length-matched", "superfiltering",
                                  "--param", "degradation.column=degradation_jsd", "--objective", "kd"]), d)


def targeted(out: str, model: str, d: dict) -> None:
    folder = os.path.join(out, "targeted")
    os.makedirs(folder, exist_ok=True)
    na, ng, nt, ne = d["targeted"]
    inputs = [{"source": s, "path": _write(os.path.join(folder, f"{s}.jsonl"), rows)}
              for s, rows in (("alpaca", _alpaca(1000, na)), ("gsm8k", _gsm(2000, ng)))]
    targets = [{"source": "gsm8k", "path": _write(os.path.join(folder, "targets.jsonl"), _gsm(3000, nt))}]
    evalset = _write(os.path.join(folder, "gsm8k_eval.jsonl"), _gsm(4000, ne))
    run = _job(out, "targeted", inputs, d["cutoff"], model, targets=targets, score__rds={"enabled": True},
               score__less={"enabled": True}, score__ifd={"enabled": False},
               score__degradation={"enabled": False})
    _report("targeted", _evaluate(out, "targeted/eval-sft", run, model, d, "random,rds=targeted,less=targeted",
                                  ["--heldout", "0", "--eval", f"gsm8k={evalset}", "--param", "rds.column=rds_score",
                                   "--param", "less.column=less_score", "--length-matched", "rds"]), d)


def _noisy_pool(out: str, model: str, d: dict, name: str, alpaca: int, gsm: int, seed: int):
    """A pool of real rows with 30% planted defects (seeded) and a clean evaluation set of rows the
    pool does not hold; returns (run folder, eval set path, the general policies' params)."""
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    na, ng, nn = d["general"]
    sources = (("alpaca", _alpaca(alpaca, na)), ("gsm8k", _gsm(gsm, ng)), ("nq", _nq(0, nn)))
    inputs, planted = [], {}
    for k, (s, rows) in enumerate(sources):
        bad, counts = defects(rows, 0.3, seed + k)
        planted[s] = counts
        inputs.append({"source": s, "path": _write(os.path.join(folder, f"{s}.jsonl"), bad)})
    total = na + ng + nn
    m = d["noisy_clean_eval"]
    # NQ rows 40-49 are the sample's rows the pool does not hold
    clean = (_alpaca(alpaca + 1500, round(m * na / total)) + _gsm(gsm + 5000, round(m * ng / total))
             + _nq(nn, round(m * nn / total)))
    evalset = _write(os.path.join(folder, "clean_eval.jsonl"), clean)
    with open(os.path.join(folder, "planted.json"), "w", encoding="utf-8") as fh:
        json.dump(planted, fh, indent=2)
    print(f"{name} pool: defects planted per source {planted}", file=sys.stderr, flush=True)
    run = _job(out, name, inputs, d["cutoff"], model)
    return run, evalset, _general_params({"alpaca": na, "gsm8k": ng, "nq": nn})


def noisy(out: str, model: str, d: dict) -> None:
    run, evalset, params = _noisy_pool(out, model, d, "noisy", 0, 0, 0)
    _report("noisy", _evaluate(out, "noisy/eval-sft", run, model, d, GENERAL_POLICIES,
                               ["--heldout", "0", "--eval", f"clean={evalset}", "--length-matched", "superfiltering",
                                *params]), d)
    # The fix tried after the table above (README): weak-model IFD ranks misaligned pairs first (it
    # stays under 1 for most of them), while r-IFD (Selective Reflection-Tuning: how much the response
    # helps predict the instruction; lower is better aligned) separates them. Rank by r-IFD, or keep
    # the better-aligned half by r-IFD and then the highest IFD.
    _report("noisy-fix", _evaluate(out, "noisy/eval-sft-fix", run, model, d,
                                   "random,aligned=top_k,aligned_superfiltering=chain",
                                   ["--heldout", "0", "--eval", f"clean={evalset}", "--length-matched", "none",
                                    *FIX_PARAMS]), d)


def _aligned_half(then: dict) -> str:
    return json.dumps([{"policy": "top_k", "params": {"column": "rifd", "higher_is_better": False},
                        "budget": {"fraction": 0.5}}, then])


# r-IFD fixes; aligned_mixture and aligned_then_mixture were designed after the noisy table, so they
# are measured on a fresh draw (noisy-replication), never on the rows that showed the failure
FIX_PARAMS = ["--param", "aligned.column=rifd", "--param", "aligned.higher_is_better=false",
              "--param", "aligned_superfiltering.steps=" + _aligned_half({"policy": "superfiltering"})]


def noisy_replication(out: str, model: str, d: dict) -> None:
    """A second noisy pool (other Alpaca and GSM8K rows, other defects, another clean set): the
    failure of IFD ranking and the r-IFD fixes measured once on rows no decision looked at."""
    na, ng, nn = d["general"]
    run, evalset, params = _noisy_pool(out, model, d, "noisy-replication", 500, 600, 10)
    shares = json.dumps({"alpaca": na, "gsm8k": ng, "nq": nn})
    mix_ifd = {"policy": "mixture", "params": {"shares": {"alpaca": na, "gsm8k": ng, "nq": nn},
                                               "score": "ifd_loss", "upper": 1.0}}
    _report("noisy-replication", _evaluate(
        out, "noisy-replication/eval-sft", run, model, d,
        "random,superfiltering,aligned=top_k,aligned_mixture=mixture,aligned_then_mixture=chain",
        ["--heldout", "0", "--eval", f"clean={evalset}", "--length-matched", "none", *FIX_PARAMS,
         "--param", f"aligned_mixture.shares={shares}", "--param", "aligned_mixture.score=rifd",
         "--param", "aligned_mixture.higher_is_better=false",
         "--param", "aligned_then_mixture.steps=" + _aligned_half(mix_ifd)]), d)
    # cluster_balanced was the one policy ahead of random on the first noisy draw per token (a metric
    # added after the tables above were first read): measured once here, on rows that decision never saw
    _report("noisy-replication", _evaluate(
        out, "noisy-replication/eval-sft-cluster", run, model, d, "random,cluster_balanced",
        ["--heldout", "0", "--eval", f"clean={evalset}", "--length-matched", "none", *params]), d)


def run(quick: bool, only: str | None = None):
    out = os.path.join(RUNS, "bench-recovery-quick" if quick else "bench-recovery")  # quick never clobbers the full run
    os.makedirs(out, exist_ok=True)
    d = QUICK if quick else FULL
    names = SCENARIOS if only is None else tuple(only.split(","))
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        sys.exit(f"benchmarks recovery: unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    t0 = time.perf_counter()
    model = _model(out, quick)
    emit("recovery", "compress", "seconds", time.perf_counter() - t0)
    for name in names:
        t1 = time.perf_counter()
        {"general": general, "targeted": targeted, "noisy": noisy, "noisy-replication": noisy_replication}[name](out, model, d)
        emit("recovery", f"{name}/wall", "seconds", time.perf_counter() - t1)
