"""A labelled near-duplicate set from real rows, and its evaluation.

Originals are real Alpaca + GSM8K rows; each gets planted copies with known
edits to its response: word substitutions, deletions and insertions at several
rates, sentence reordering, and case / white-space changes. Unrelated rows are
other real rows. The true Jaccard of every (copy, original) pair and of every
removed row to its cluster's kept row is computed by brute force on Python sets
of word n-grams: an implementation independent of the vectorized hashing.
"""
from __future__ import annotations

import json
import random
import re
import unicodedata

EDITS = [("sub", 0.02), ("sub", 0.05), ("sub", 0.10), ("sub", 0.20), ("del", 0.05), ("del", 0.15),
         ("ins", 0.05), ("ins", 0.15), ("reorder", 0.0), ("case_space", 0.0)]
BUCKETS = [(0.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0001)]


def shingle_set(text: str, n: int = 5) -> set:
    words = unicodedata.normalize("NFKC", text).casefold().split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def near_text(row: dict) -> str:
    prompt = row["instruction"] + ("\n\n" + row["input"] if row.get("input", "").strip() else "")
    return prompt + "\n" + row["output"]


def _edit(text: str, kind: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split(" ")
    k = max(1, round(rate * len(words)))
    if kind == "sub":
        for i in rng.sample(range(len(words)), min(k, len(words))):
            words[i] = rng.choice(vocab)
    elif kind == "del":
        drop = set(rng.sample(range(len(words)), min(k, len(words) - 1)))
        words = [w for i, w in enumerate(words) if i not in drop]
    elif kind == "ins":
        for _ in range(k):
            words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
    elif kind == "reorder":
        sentences = re.split(r"(?<=[.!?])\s+", text)
        if len(sentences) > 1:
            rng.shuffle(sentences)
        return " ".join(sentences)
    elif kind == "case_space":
        return "  ".join(w.upper() if rng.random() < 0.3 else w for w in words)
    return " ".join(words)


def build(rows: list[dict], n_originals: int, n_unrelated: int, seed: int = 0,
          min_words: int = 40) -> tuple[list[dict], dict]:
    """(rows with ids, labels): copies are ``<original id>~<edit>``; labels map copy -> original."""
    rng = random.Random(seed)
    pool = [r for r in rows if len(near_text(r).split()) >= min_words]
    rng.shuffle(pool)
    vocab = sorted({w for r in pool[:500] for w in r["output"].split() if w.isalpha()})
    originals, unrelated = pool[:n_originals], pool[n_originals:n_originals + n_unrelated]
    out, labels = [], {"copies": {}, "unrelated": [], "originals": []}
    for i, r in enumerate(originals):
        oid = f"o{i:05d}"
        out.append({**r, "id": oid})
        labels["originals"].append(oid)
        for kind, rate in EDITS:
            cid = f"{oid}~{kind}{int(rate * 100):02d}"
            copy = {**r, "id": cid, "output": _edit(r["output"], kind, rate, rng, vocab)}
            if copy["output"] == r["output"] and kind != "case_space":
                continue
            out.append(copy)
            labels["copies"][cid] = oid
    for i, r in enumerate(unrelated):
        uid = f"u{i:05d}"
        out.append({**r, "id": uid})
        labels["unrelated"].append(uid)
    rng.shuffle(out)
    return out, labels


def evaluate(rows: list[dict], labels: dict, annotated: list[dict], threshold: float = 0.8) -> dict:
    """Recall per true-Jaccard bucket, precision of removals, pair-level P/R/F1."""
    def bare(x):  # annotated ids are "<source>:<id>" for a source with an id column
        return x.split(":", 1)[1] if isinstance(x, str) else None

    annotated = [{**a, **{k: bare(a[k]) for k in ("id", "near_dup_of", "near_dup_cluster")}} for a in annotated]
    text = {r["id"]: near_text(r) for r in rows}
    shingles = {i: shingle_set(t) for i, t in text.items()}
    ann = {a["id"]: a for a in annotated}
    cluster = {i: a["near_dup_cluster"] for i, a in ann.items()}
    per_bucket = {f"{lo:.1f}-{min(hi, 1.0):.1f}": [0, 0] for lo, hi in BUCKETS}
    tp = fp = fn = 0
    for cid, oid in labels["copies"].items():
        j = jaccard(shingles[cid], shingles[oid])
        together = cluster[cid] is not None and cluster[cid] == cluster[oid]
        for lo, hi in BUCKETS:
            if lo <= j < hi:
                b = per_bucket[f"{lo:.1f}-{min(hi, 1.0):.1f}"]
                b[0] += together
                b[1] += 1
        if j >= threshold:
            tp += together
            fn += not together
        else:
            fp += together
    removed = [a for a in annotated if a["drop_reason"] == "near_duplicate"]
    low = [a["id"] for a in removed if jaccard(shingles[a["id"]], shingles[a["near_dup_of"]]) < 0.7]
    unrelated_removed = [u for u in labels["unrelated"] if ann[u]["drop_reason"] == "near_duplicate"]
    hi_bucket = per_bucket["0.9-1.0"]
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {
        "recall_ge_0.9": hi_bucket[0] / hi_bucket[1] if hi_bucket[1] else None,
        "recall_by_bucket": {k: {"together": v[0], "copies": v[1], "recall": round(v[0] / v[1], 4) if v[1] else None}
                             for k, v in per_bucket.items()},
        "removed": len(removed),
        "removed_below_0.7": len(low),
        "removed_below_0.7_share": len(low) / len(removed) if removed else 0.0,
        "unrelated_removed": len(unrelated_removed),
        "pair_precision": round(precision, 4),
        "pair_recall": round(recall, 4),
        "pair_f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
    }


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
