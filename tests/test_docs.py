"""Docs that are tested: every YAML job snippet validates, every `curate ...` command shown parses
with the real parser, the generated reference matches the code, every relative link resolves, and
the site builds with --strict. Each checker is also shown to catch the break it exists for."""
import contextlib
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

DOCS = os.path.join(REPO, "docs")
PAGES = [os.path.join(REPO, "README.md")] + sorted(
    p for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)
    if not p.startswith(os.path.join(DOCS, "reference") + os.sep))
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)  # fences inside list items too
BASE_JOB = {"output": "out", "inputs": [{"source": "a", "path": "a.jsonl"}]}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_problems(text: str) -> list[str]:
    """Each ```yaml block of a page: a whole job, or job sections merged into a minimal job, must
    pass `curate validate`'s checks (files are not looked for: snippets name example paths)."""
    from curate import config
    from curate.settings import Job, schema_of

    sections = set(schema_of(Job))
    out = []
    for lang, body in FENCE.findall(text):
        if lang != "yaml":
            continue
        try:
            raw = yaml.safe_load(body)
            if not isinstance(raw, dict) or not set(raw) <= sections:
                raise ValueError(f"not a job or job sections: top-level keys {sorted(raw or {})}")
            config.validate(_merge(BASE_JOB, raw), check_files=False)
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            out.append(f"{body.splitlines()[0] if body.strip() else '(empty)'}...: {exc}")
    return out


def commands(text: str) -> list[str]:
    """`curate ...` command lines shown: in code blocks and in inline code."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang in ("", "bash", "sh", "console", "shell"):
            found += body.replace("\\\n", " ").splitlines()  # a continued line is one command
    # inline code: a command with arguments (a bare `curate select` names the command, it is no command line)
    found += [c for c in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)) if len(c.split()) > 2]
    out = []
    for line in found:
        line = re.sub(r"^\$ ", "", line.strip())
        m = re.match(r"^(?:\.venv/bin/)?curate (.*)$", line)
        if m:
            out.append(m.group(1))
    return out


def command_problems(lines: list[str]) -> list[str]:
    """Each command parses with curate's own parser: a synopsis's [optional] groups are dropped and
    a|b alternatives take the first; an unknown flag or command is a finding."""
    from curate.cli import parser

    out = []
    for line in lines:
        text = re.sub(r"\s+#.*$", "", line)
        while re.search(r"\[[^\[\]]*\]", text):
            text = re.sub(r"\s*\[[^\[\]]*\]", "", text)
        try:
            args = [a.split("|")[0] if "|" in a else a for a in shlex.split(text)]
            with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its usage before exiting
                ns, extra = parser().parse_known_args(args)
        except (SystemExit, ValueError):
            out.append(f"curate {line}: does not parse")
            continue
        bad = [e for e in extra if not (ns.command == "run" and re.match(r"^--\w+(=|$)", e))]
        if bad:
            out.append(f"curate {line}: unknown {' '.join(bad)}")
    return out


def test_every_yaml_snippet_validates():
    problems = {p: yaml_problems(open(p, encoding="utf-8").read()) for p in PAGES}
    assert {p: v for p, v in problems.items() if v} == {}
    assert sum(len(FENCE.findall(open(p, encoding="utf-8").read())) for p in PAGES) > 20  # the pages were read


def test_every_curate_command_shown_parses():
    lines = [(p, c) for p in PAGES for c in commands(open(p, encoding="utf-8").read())]
    assert len(lines) >= 15
    problems = [f"{os.path.relpath(p, REPO)}: {x}" for p, c in lines for x in command_problems([c])]
    assert problems == []


def test_the_checkers_catch_what_they_exist_for():
    assert yaml_problems("```yaml\nselect:\n  policy: top_k\n  budget: {rowz: 3}\n```\n")  # a misspelled key
    assert yaml_problems("```yaml\ndedup:\n  near:\n    threshold: 2.0\n```\n")  # out of bounds
    assert not yaml_problems("```yaml\ndedup:\n  near:\n    threshold: 0.7\n```\n")
    assert command_problems(["select runs/demo --policy random --rowz 5"])  # an unknown flag
    assert command_problems(["selekt runs/demo"])  # an unknown command
    assert not command_problems(["select OUTPUT_DIR --policy NAME [--param k=v ...] [--rows N | --fraction F]"])
    assert not command_problems(["run job.yaml --direct_num_workers=2"])  # Beam options pass through


def test_the_generated_reference_is_current(tmp_path):
    from curate import reference

    assert reference.stale(os.path.join(DOCS, "reference")) == [], \
        "regenerate: python -m curate.reference docs/reference"
    shutil.copytree(os.path.join(DOCS, "reference"), tmp_path / "ref")
    page = tmp_path / "ref" / "job-file.md"
    page.write_text(page.read_text().replace("rows per batch in per-record stages", "rows per batch"))
    assert reference.stale(str(tmp_path / "ref")) == ["job-file.md"]  # a drifted page is caught
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-m", "curate.reference", "--check", str(tmp_path / "ref")],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 1 and "job-file.md" in done.stderr


def test_every_option_policy_parameter_and_reason_has_a_meaning():
    import dataclasses

    from curate import reasons
    from curate.select import available
    from curate.settings import Job

    def walk(cls):
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "opt" in meta:
                yield cls.__name__, f.name, meta.get("doc")
            for key in ("section", "list_of"):
                if key in meta:
                    yield from walk(meta[key])
    assert [(c, n) for c, n, doc in walk(Job) if not doc] == []
    assert all(spec.doc for cls in available().values() for spec in cls.params.values())
    emitted = set()
    reason = re.compile(r'dropped\[[^\]]+\] = "(\w+)"|return "(\w+)"\s*$|over(?:_reason)?(?:: str)? ?= ?"(\w+)"'
                        r'|: "(\w+)" for i in range', re.M)
    for path in glob.glob(os.path.join(REPO, "curate", "select", "*.py")):
        emitted |= {x for groups in reason.findall(open(path, encoding="utf-8").read()) for x in groups if x}
    emitted -= {"top", "auto", "uniform", "softmax"}  # return values of other functions
    assert emitted and emitted <= set(reasons.POLICY), emitted - set(reasons.POLICY)


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", open(page, encoding="utf-8").read())):
            if re.match(r"^(https?:|mailto:|#)", target):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, REPO)} -> {target}")
    assert broken == []


def test_the_readme_is_short():
    assert len(open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines()) < 300


@pytest.mark.skipif(shutil.which("mkdocs", path=os.path.dirname(sys.executable)) is None,
                    reason="mkdocs is a dev extra")
def test_the_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mkdocs"), "build", "--strict",
                           "--site-dir", str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr
    assert os.path.isfile(tmp_path / "site" / "reference" / "job-file" / "index.html")


def test_the_benchmarks_page_is_what_the_result_files_give(tmp_path):
    from benchmarks import results_page

    assert open(results_page.PAGE, encoding="utf-8").read() == results_page.render(), \
        "regenerate: python -m benchmarks.results_page"
    out = 'noise\n{"name": "x", "case": "a/1", "metric": "rows_per_s", "value": 2.5, "baseline": "script", ' \
          '"baseline_value": 5.0, "ratio": 0.5, "cpu": "Some CPU, 2 cores"}\n'
    path = results_page.save("x", "python -m benchmarks x", "a note", out, folder=str(tmp_path))
    page = results_page.render(str(tmp_path))
    assert "`python -m benchmarks x`" in page and "Some CPU, 2 cores" in page and "| a/1 | rows_per_s | 2.5 |" in page
    with pytest.raises(ValueError, match="no benchmark JSON"):
        results_page.save("y", "c", "", "nothing here", folder=str(tmp_path))
    assert os.path.basename(path) == "x.jsonl"
