"""Selection on real runs: the job's policy step, `curate select` with every built-in, the plugin
path through the CLI, exports, report.html and the notebook, all on one scored two-source run."""
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest

from conftest import REPO, load_manifest, read_table, run_cli, shared, without_models, write_job

PER_SOURCE = 10
# the tests share one scored run (a module fixture): one xdist worker runs them all (`--dist loadgroup`)
pytestmark = pytest.mark.xdist_group("selection_run")


def _digests(folder) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """Alpaca + GSM8K, 10 seeded rows each, every stage on (real embedder, k-means, weak-LM IFD)."""
    d = tmp_path_factory.mktemp("scored")
    cfg = {"name": "scored", "output": str(d / "out"), "seed": 0,
           "inputs": [{"source": "alpaca", "path": shared("alpaca_cherry_5pct.json")},
                      {"source": "gsm8k", "path": shared("gsm8k_train.json")}],
           "sample": {"mode": "random", "n": PER_SOURCE},
           "cluster": {"k": 4},
           "score": {"ifd": {"cache_dir": str(d / "cache"), "max_length": 128}},  # short: the test is about selection
           "select": {"policy": "superfiltering", "budget": {"fraction": 0.5}}}
    assert run_cli("run", write_job(d, cfg)) == 0
    return d / "out"


def test_the_jobs_policy_ranks_selected_rows_and_gives_every_dropped_row_a_reason(scored_run):
    t = read_table(scored_run, "annotated").to_pylist()
    man = load_manifest(scored_run)
    assert man["accounting"]["holds"] and len(t) == 2 * PER_SOURCE
    chosen = [r for r in t if r["selected"]]
    assert sorted(r["rank"] for r in chosen) == list(range(1, len(chosen) + 1))
    assert all(r["rank"] is None and r["drop_reason"] for r in t if not r["selected"])
    valid = [r for r in t if r["ifd_loss"] == r["ifd_loss"] and 0 < r["ifd_loss"] < 1]
    assert len(chosen) == min(round(0.5 * len(t)), len(valid))
    # the selected rows are the highest IFD below 1, in rank order
    best = sorted(valid, key=lambda r: (-r["ifd_loss"], r["id"]))[:len(chosen)]
    assert [r["id"] for r in sorted(chosen, key=lambda r: r["rank"])] == [r["id"] for r in best]
    assert all(r["drop_reason"].startswith("superfiltering:") for r in t if not r["selected"])
    sel = man["select"]
    assert sel["policy"] == "superfiltering" and sel["pool"] == len(t) and sel["selected"] == len(chosen)
    assert sum(v["selected"] for v in sel["by_source"].values()) == len(chosen)
    assert sum(v["pool"] for v in sel["by_cluster"].values()) == len(t)
    selected = read_table(scored_run, "selected")
    assert selected.num_rows == len(chosen) and "messages" in selected.column_names
    assert os.path.isfile(os.path.join(scored_run, "report.html"))


def test_cluster_scope_in_the_job_equals_curate_select_and_keeps_each_clusters_share(tmp_path, capsys, monkeypatch):
    """select.scope: cluster in the Beam job (grouped by cluster, budget split, ranks interleaved,
    numbered range by range: 2 rows a range here) decides exactly what ``curate select --scope
    cluster`` decides in one process (one sorted list)."""
    from curate.select import Budget
    from curate.select import scope
    from curate.select.scope import split_budget

    monkeypatch.setattr(scope, "RANK_BUCKET_ROWS", 2)

    cfg = {"name": "scoped", "output": str(tmp_path / "scoped"), "seed": 0,
           "inputs": [{"source": "alpaca", "path": shared("alpaca_cherry_5pct.json")},
                      {"source": "gsm8k", "path": shared("gsm8k_train.json")}],
           "sample": {"mode": "random", "n": PER_SOURCE}, "cluster": {"k": 4},
           "score": {"ifd": {"enabled": False}},  # facility location needs embeddings only
           "select": {"policy": "facility_location", "budget": {"fraction": 0.4}, "scope": "cluster"}}
    assert run_cli("run", write_job(tmp_path, cfg)) == 0
    job = {r["id"]: (r["rank"], r["drop_reason"]) for r in read_table(tmp_path / "scoped", "annotated").to_pylist()}
    man = load_manifest(tmp_path / "scoped")
    assert man["accounting"]["holds"] and man["select"]["scope"] == "cluster"
    out = tmp_path / "again"
    assert run_cli("select", str(tmp_path / "scoped"), "--policy", "facility_location", "--fraction", "0.4",
                   "--scope", "cluster", "--out", str(out)) == 0
    again = {r["id"]: (r["rank"], r["drop_reason"]) for r in pq.read_table(out / "decisions.parquet").to_pylist()}
    assert again == job
    by_cluster = man["select"]["by_cluster"]
    shares = split_budget(Budget(fraction=0.4), {int(c): (v["pool"], 0) for c, v in by_cluster.items()})
    assert {c: v["selected"] for c, v in by_cluster.items()} == {str(c): b.rows for c, b in shares.items()}
    assert sum(b.rows for b in shares.values()) == round(0.4 * 2 * PER_SOURCE) == man["select"]["selected"]
    capsys.readouterr()
    assert run_cli("select", str(tmp_path / "scoped"), "--policy", "mixture", "--param", "shares={alpaca: 1}",
                   "--fraction", "0.4", "--scope", "cluster") == 2  # global by nature: refused in one line
    assert "policy mixture: cannot run with select.scope: cluster" in capsys.readouterr().err


BUILTIN_CASES = [
    ("all", []), ("random", ["--tokens", "4000"]),
    ("threshold", ["--param", "column=ifd_ppl", "--param", "max=0.9"]),
    ("top_k", ["--param", "column=rifd", "--param", "higher_is_better=false", "--rows", "5"]),
    ("superfiltering", ["--fraction", "0.3"]),
    ("superfiltering_diverse", ["--param", "ifd_fraction=0.5", "--rows", "6"]),
    ("facility_location", ["--param", "kernel=knn", "--param", "neighbors=8", "--rows", "6"]),
    ("cluster_balanced", ["--param", "quota=sqrt", "--param", "score=ifd_loss", "--param", "within=softmax",
                          "--rows", "8"]),
    ("deita", ["--param", "column=ifd_loss", "--param", "threshold=0.5", "--rows", "8"]),
    ("mixture", ["--param", "shares={alpaca: 0.75, gsm8k: 0.25}", "--fraction", "0.5"]),
    ("chain", ["--param", "steps=[{policy: superfiltering, budget: {fraction: 0.5}}, "
                          "{policy: facility_location, budget: {rows: 4}}]"]),
]


@pytest.mark.parametrize("name,args", BUILTIN_CASES, ids=[c[0] for c in BUILTIN_CASES])
def test_curate_select_runs_every_builtin_on_a_finished_run(scored_run, tmp_path, capsys, name, args):
    before = read_table(scored_run, "annotated")
    files_before = _digests(scored_run / "annotated")
    outs = []
    for k in ("a", "b"):
        out = tmp_path / k
        assert run_cli("select", scored_run, "--policy", name, *args, "--seed", "3", "--out", out) == 0
        outs.append(out)
    printed = capsys.readouterr().out
    assert "source" in printed and "alpaca" in printed and "gsm8k" in printed and "cluster" in printed
    one, two = (pq.read_table(o / "decisions.parquet").to_pylist() for o in outs)
    assert one == two  # same seed, same decisions
    chosen = [r for r in one if r["selected"]]
    assert chosen and len(one) == before.num_rows
    rep = json.loads((outs[0] / "selection.json").read_text())
    assert rep["selected"] == len(chosen) and sum(rep["dropped"].values()) == rep["pool"] - len(chosen)
    assert sum(v["selected"] for v in rep["by_cluster"].values()) == len(chosen)
    sel = pq.read_table(outs[0] / "selected")
    assert sel.schema.field("messages").type == read_table(scored_run, "selected").schema.field("messages").type
    assert str(sel.schema.field("messages").type).startswith("list<item: ")  # as schemas/ documents it
    sel = sel.to_pylist()
    assert [r["rank"] for r in sel] == list(range(1, len(sel) + 1))
    assert _digests(scored_run / "annotated") == files_before  # the run itself is untouched


def test_a_folder_without_its_final_manifest_is_refused_by_every_reader(scored_run, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(scored_run, half)
    (half / "manifest.json").unlink()  # what a run that stopped before its last write leaves
    for argv in (("inspect", half), ("select", half, "--policy", "all"), ("export", half, "--format", "alpaca-json"),
                 ("report", half)):
        assert run_cli(*argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no manifest.json (not a finished curate run)" in err[0], argv
    assert not (half / "selections").exists() and not (half / "export").exists()


def test_select_errors_are_one_line(scored_run, tmp_path, capsys):
    assert run_cli("select", scored_run, "--policy", "superfilter", "--rows", "3") == 2
    assert "did you mean 'superfiltering'" in capsys.readouterr().err
    assert run_cli("select", scored_run, "--policy", "top_k", "--param", "column=nope", "--rows", "3") == 2
    assert "needs the column(s) nope" in capsys.readouterr().err
    assert run_cli("select", tmp_path, "--policy", "all") == 2
    assert "not a finished curate run" in capsys.readouterr().err
    (tmp_path / "afile").write_text("keep me too")
    assert run_cli("select", scored_run, "--policy", "all", "--out", tmp_path / "afile") == 2
    assert "is not a curate selection" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "keep me too"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert run_cli("select", scored_run, "--policy", "all", "--out", tmp_path / "mine") == 2
    assert "is not a curate selection" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_exports_load_back_and_round_trip_the_text(scored_run, tmp_path):
    selected = read_table(scored_run, "selected").sort_by([("rank", "ascending")]).to_pylist()
    paths = {}
    for fmt, name in (("alpaca-json", "a.json"), ("sharegpt-json", "s.json"), ("messages-jsonl", "m.jsonl")):
        paths[fmt] = tmp_path / name
        assert run_cli("export", scored_run, "--format", fmt, "--out", paths[fmt]) == 0
    alpaca = json.loads(paths["alpaca-json"].read_text(encoding="utf-8"))
    with open(paths["messages-jsonl"], encoding="utf-8") as fh:
        messages = [json.loads(line) for line in fh]
    sharegpt = json.loads(paths["sharegpt-json"].read_text(encoding="utf-8"))
    assert len(alpaca) == len(messages) == len(sharegpt) == len(selected)
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for row, a, m, s in zip(selected, alpaca, messages, sharegpt):
        original = json.loads(row["original"])  # the input row as read
        assert (a["instruction"], a["input"], a["output"]) == (original["instruction"], original.get("input", ""),
                                                               original["output"])
        assert m["id"] == s["id"] == row["id"] and m["messages"] == row["messages"]
        assert [{"role": roles[t["from"]], "content": t["value"]} for t in s["conversations"]] == row["messages"]
        assert m["messages"][-1] == {"role": "assistant", "content": original["output"]}


class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self._in = {}, {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._in = attrs.get("id")
            self.sections[self._in] = ""
            self.images[self._in] = 0
        elif tag == "img" and self._in and attrs.get("src", "").startswith("data:image/png;base64,"):
            self.images[self._in] += 1

    def handle_data(self, data):
        if self._in:
            self.sections[self._in] += data


def test_report_has_every_section_and_renders_in_chromium(scored_run, tmp_path):
    from curate.report import SECTIONS

    path = tmp_path / "report.html"
    assert run_cli("report", scored_run, "--out", path) == 0
    parsed = _Sections()
    parsed.feed(path.read_text(encoding="utf-8"))
    assert list(parsed.sections) == list(SECTIONS)
    for plotted in ("funnel", "scores", "clusters", "map"):
        assert parsed.images[plotted] == 1, plotted
    assert "superfiltering" in parsed.sections["policy"] and "alpaca" in parsed.sections["summary"]
    assert "exact duplicates" in parsed.sections["duplicates"]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium not installed: the sections were checked by parsing (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", path.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    assert len(set(img.resize((120, 240)).getdata())) > 20  # plots and text, not a blank page


def test_notebook_executes_against_a_finished_run(scored_run, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("CURATE_RUN", str(scored_run))
    folder = os.path.join(REPO, "notebooks")
    nb = nbformat.read(os.path.join(folder, "explore_run.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 4


def test_a_plugin_policy_installs_and_runs_a_job_through_the_cli(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), os.path.join(REPO, "examples", "policy_plugin")],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    curate = [sys.executable, "-m", "curate"]
    listed = subprocess.run(curate + ["policies"], env=env, capture_output=True, text=True, check=True).stdout
    assert "longest_response  [plugin" in listed and "min_chars" in listed
    assert ("deita  [built-in]  needs embeddings\n" in listed and "scope: global; on a large pool (scope global): "
            "shortlist: a seeded random sample of select.max_candidates rows" in listed.split("paser  [")[1])
    cfg = without_models({"name": "plugin", "output": str(tmp_path / "out"),
                          "inputs": [{"source": "gsm8k", "path": shared("gsm8k_train.json")}],
                          "sample": {"mode": "head", "n": 30},
                          "select": {"policy": "longest_response", "params": {"min_chars": 200},
                                     "budget": {"rows": 5}}})
    done = subprocess.run(curate + ["run", write_job(tmp_path, cfg)], env=env, capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_table(tmp_path / "out", "annotated").to_pylist()
    chosen = sorted((r for r in rows if r["selected"]), key=lambda r: r["rank"])
    longest = sorted(rows, key=lambda r: (-len(r["response"]), r["id"]))[:5]
    assert [r["id"] for r in chosen] == [r["id"] for r in longest]
    reasons = {r["drop_reason"] for r in rows if not r["selected"]}
    assert reasons <= {"longest_response:too_short", "longest_response:over_budget"}
    assert load_manifest(tmp_path / "out")["select"]["policy"] == "longest_response"
    # without the plugin installed the same job fails with one line naming the policy
    bare = subprocess.run(curate + ["validate", write_job(tmp_path, cfg)], capture_output=True, text=True, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert bare.returncode == 2 and "unknown policy 'longest_response'" in bare.stderr


def test_report_shows_duplicate_pairs_and_says_what_a_run_lacks(tmp_path):
    from conftest import EXAMPLES

    cfg = without_models({"name": "dups", "output": str(tmp_path / "out"),
                          "inputs": [{"source": "alpaca", "path": os.path.join(EXAMPLES, "alpaca_cherry_sample.json")}]})
    assert run_cli("run", write_job(tmp_path, cfg)) == 0
    parsed = _Sections()
    parsed.feed((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    dups = parsed.sections["duplicates"]
    annotated = read_table(tmp_path / "out", "annotated").to_pylist()
    for column in ("exact_dup_of", "near_dup_of"):
        pair = next(r for r in annotated if r[column])
        assert pair["id"] in dups and pair[column] in dups  # the dropped row beside the kept one
    assert "No scores" in parsed.sections["scores"] and "No embeddings map" in parsed.sections["map"]
    assert parsed.images["funnel"] == 1 and parsed.images["scores"] == 0
