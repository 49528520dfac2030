"""Embeddings and k-means: the Beam stages against the bare library calls, in one process.

- embed: 5,000 real texts (instruction + response), batch 64, all-MiniLM-L6-v2 on the
  CPU. Bare ``SentenceTransformer.encode`` at steady state (after a warm-up batch) vs
  the curate ``Embed`` stage (RunInference) on the local runner; the stage's time
  includes its own model load, which is measured separately and reported, and
  subtracted for the steady-state ratio. The stage's float32 linear kernel is the one
  ``curate.kernel_choice`` picks on this CPU; bare encode is timed with both kernels
  (``linear_kernel_choice``) so the pick can be checked. Also bf16 vs fp32: speed and cosine
  (on a CPU without native bf16, a few batches only: it runs at a fraction of fp32's speed).
- kmeans: the curate ``Cluster`` stage (seeded sample, FAISS spherical k-means,
  batched assignment) vs bare ``faiss.Kmeans`` + ``IndexFlatIP`` on the same vectors.
Peak memory is the process's maximum resident size (ru_maxrss) after each case.
"""
from __future__ import annotations

import resource
import time

import apache_beam as beam
import numpy as np

from benchmarks.common import emit, real_rows
from curate import cluster as clustering
from curate import kernel_choice
from curate.embed import embed_text, encode, load_embedder
from curate.onednn import use_onednn

BATCH = 64


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _records(n: int) -> list[dict]:
    rows = real_rows()
    out = []
    for i in range(n):
        r = rows[(i * 7919) % len(rows)]  # spread over both sources
        prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"].strip() else "")
        out.append({"id": f"r{i:06d}", "source": "bench", "prompt": prompt, "response": r["output"]})
    return out


def _run_pipeline(build) -> float:
    from apache_beam.options.pipeline_options import PipelineOptions

    start = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        build(p)
    return time.perf_counter() - start


def run(quick: bool):
    from curate.settings import Cluster as ClusterSettings
    from curate.settings import Embed as EmbedSettings
    from pipelines.embed_cluster import Cluster, Embed

    n = 640 if quick else 5_000  # quick: ten batches, 114 s on 2 cores of an AMD EPYC with AVX2 only
    recs = _records(n)
    texts = [embed_text(r) for r in recs]

    t = time.perf_counter()
    model = load_embedder(None, "cpu", "float32", 256)
    load_s = time.perf_counter() - t
    encode(model, texts[:BATCH])  # warm-up
    t = time.perf_counter()
    bare = np.concatenate([encode(model, texts[i:i + BATCH]) for i in range(0, n, BATCH)])
    bare_s = time.perf_counter() - t
    bare_peak = _peak_mb()

    choice = kernel_choice.choose(lambda: kernel_choice.linear_shapes(model), "auto")
    linear = choice.kernel  # what the stage uses on this CPU
    rates = {"torch": n / bare_s}
    if use_onednn(model):
        encode(model, texts[:BATCH])
        t = time.perf_counter()
        for i in range(0, n, BATCH):
            encode(model, texts[i:i + BATCH])
        rates["onednn"] = n / (time.perf_counter() - t)
        use_onednn(model, on=False)
    other = next(k for k in kernel_choice.KERNELS if k != linear)
    emit("embed", "linear_kernel_choice", "rows_per_s", rates[linear], f"{other}_linear", rates.get(other), n=n,
         chosen=linear, how=choice.how, chooser_gflops=choice.gflops,
         note="bare encode with each float32 kernel; ratio above 1: the chooser picked the faster one")
    stage_cfg = EmbedSettings(batch_size=BATCH, cache=False)
    rt = {"device": "cpu", "dtype": "float32", "linear": linear, "dim": bare.shape[1]}  # no cache: always computed
    stage_s = _run_pipeline(lambda p: (p | beam.Create(recs, reshuffle=False)
                                       | Embed(stage_cfg, rt))["records"]
                          | beam.Map(lambda r: None))
    steady = max(stage_s - load_s, 1e-9)
    emit("embed", "beam_stage_vs_bare_encode", "rows_per_s", n / steady, "sentence_transformers_encode",
         n / bare_s, n=n, batch=BATCH, stage_wall_s=round(stage_s, 2), model_load_s=round(load_s, 2),
         note="stage rows/s with its model load subtracted; target: at least 1.0x bare encode", peak_rss_mb=_peak_mb(),
         linear=linear,
         baseline_peak_rss_mb=bare_peak)

    m = n if kernel_choice.native_bf16() else 2 * BATCH
    bf16 = load_embedder(None, "cpu", "bfloat16", 256)
    encode(bf16, texts[:BATCH])
    t = time.perf_counter()
    low = np.concatenate([encode(bf16, texts[i:i + BATCH]) for i in range(0, m, BATCH)])
    bf16_s = time.perf_counter() - t
    cos = (low * bare[:m]).sum(axis=1)
    emit("embed", "bf16_vs_fp32_cpu", "rows_per_s", m / bf16_s, "fp32", n / bare_s, n=m,
         min_cosine_to_fp32=round(float(cos.min()), 6), mean_cosine_to_fp32=round(float(cos.mean()), 6))

    k = clustering.default_k(n)
    cfg = ClusterSettings(seed=0)
    with_vec = [{**r, "_vector": v} for r, v in zip(recs, bare)]
    stage_k_s = _run_pipeline(lambda p: (p | beam.Create(with_vec, reshuffle=False)
                                         | Cluster(cfg, False))["records"] | beam.Map(lambda r: None))
    empty_s = _run_pipeline(lambda p: p | beam.Create(with_vec, reshuffle=False) | beam.Map(lambda r: None))
    import faiss

    t = time.perf_counter()
    km = faiss.Kmeans(bare.shape[1], k, niter=20, seed=0, spherical=True, min_points_per_centroid=1,
                      max_points_per_centroid=n)
    km.train(bare[:min(n, 256 * k)])
    index = faiss.IndexFlatIP(bare.shape[1])
    index.add(km.centroids)
    index.search(bare, 1)
    bare_k_s = time.perf_counter() - t
    emit("embed", "kmeans_stage_vs_bare_faiss", "rows_per_s", n / stage_k_s, "faiss_kmeans", n / bare_k_s, n=n,
         k=k, stage_wall_s=round(stage_k_s, 3), baseline_wall_s=round(bare_k_s, 3), peak_rss_mb=_peak_mb(),
         same_pipeline_without_kmeans_s=round(empty_s, 3),
         kmeans_net_of_pipeline_s=round(max(stage_k_s - empty_s, 0.0), 3),
         note="stage time includes Beam's start-up and moving the vectors; the net figure subtracts a "
              "pipeline that only moves the same records")
