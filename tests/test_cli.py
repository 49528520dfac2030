"""The command line as a user runs it: a real subprocess, exit codes, one-line errors."""
import os
import subprocess
import sys

from tests.conftest import without_models, EXAMPLES, REPO, write_job

CURATE = [sys.executable, "-m", "curate"]


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([*CURATE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_misspelled_key_is_a_one_line_error_with_exit_2(tmp_path):
    job = write_job(tmp_path, without_models({"output": "o", "inputs": [{"source": "a", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
                               "dedup": {"exact": {"enabeld": True}}}))
    for cmd in ("run", "validate"):
        res = _run(cmd, job, cwd=tmp_path)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert lines[-1] == "curate: error: unknown key 'dedup.exact.enabeld' (did you mean 'enabled'?)"
        assert "Traceback" not in res.stderr


def test_missing_input_file_is_a_one_line_error_with_exit_2(tmp_path):
    job = write_job(tmp_path, without_models({"output": "o", "inputs": [{"source": "a", "path": "nowhere/data.jsonl"}]}))
    res = _run("run", job, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == \
        "curate: error: inputs[0].path: no file matches 'nowhere/data.jsonl'"
    assert "Traceback" not in res.stderr


def test_a_job_key_given_as_an_option_is_refused_not_passed_to_beam(tmp_path):
    """Beam keeps options it does not know for the runner: "--output x" would be dropped silently
    and the job's own output (perhaps overwritten) used instead."""
    job = write_job(tmp_path, without_models({"output": "o", "inputs": [{"source": "a", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}]}))
    for args in (("--output", "elsewhere"), ("--seed=3",)):
        res = _run("run", job, *args, "--overwrite", cwd=tmp_path)
        assert res.returncode == 2
        key = args[0][2:].split("=")[0]
        assert res.stderr.strip().splitlines()[-1] == \
            f"curate: error: --{key} is a job setting, not a Beam option: use --set {key}=VALUE"
    assert not (tmp_path / "o").exists() and not (tmp_path / "elsewhere").exists()


def test_run_prints_outputs_and_inspect_reads_them(tmp_path):
    job = write_job(tmp_path, without_models({"output": "o", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}]}))
    res = _run("run", job, "--set", "sample.mode=head", "--set", "sample.n=40",
               "--direct_num_workers", "1", cwd=tmp_path)  # a Beam option written "--name value"
    assert res.returncode == 0, res.stderr
    assert "40 rows in -> 40 selected" in res.stdout
    assert f"outputs in {tmp_path / 'o'}/" in res.stdout
    ins = _run("inspect", "o", cwd=tmp_path)
    assert ins.returncode == 0 and "accounting holds" in ins.stdout and "gsm8k" not in ins.stderr
    bad = _run("inspect", "nothing-here", cwd=tmp_path)
    assert bad.returncode == 2 and "not a finished curate run" in bad.stderr
    val = _run("validate", job, cwd=tmp_path)
    assert val.returncode == 0 and "valid; 1 source(s), 1 file(s)" in val.stdout


def test_the_crash_log_of_a_run_with_an_output_on_a_store_is_written_on_this_disk(tmp_path, monkeypatch):
    """Never a local folder named ``s3:`` or ``gs:`` (the URL taken for a path): under the cache."""
    from curate.cli import crash_log

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        raise RuntimeError("broken on purpose")
    except RuntimeError as exc:
        remote = crash_log("run", "gs://bucket/runs/a", exc)
        local = crash_log("run", str(tmp_path / "out"), exc)
    assert remote.startswith(str(tmp_path / "cache" / "logs")) and "broken on purpose" in open(remote).read()
    assert local.startswith(str(tmp_path / "out.error-"))
    assert sorted(os.listdir(tmp_path)) == ["cache", os.path.basename(local)]


def test_a_recovery_prints_curates_lines_not_library_noise(job_dir, monkeypatch):
    """transformers' "Loading weights" bar and (peft < 0.22) a FutureWarning about a deprecated
    property came twice per recovery; they are hidden, and -v shows the bar again. peft 0.22 no
    longer warns, so only the bar is asked of -v."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curate.models import weak_lm_folder
    from tests.conftest import run_cli

    tok = AutoTokenizer.from_pretrained(weak_lm_folder())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained("tiny")
    tok.save_pretrained("tiny")
    cfg = {"output": "run", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "sample": {"mode": "head", "n": 4}}
    assert run_cli("run", write_job(job_dir, without_models(cfg))) == 0
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # set by the in-process run above
    args = ["recover", "run", "--model", "tiny", "--steps", "1", "--batch-size", "2", "--cutoff", "256"]
    quiet = _run(*args, "--out", "a", cwd=job_dir)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Loading weights" not in quiet.stderr and "is_gradient_checkpointing" not in quiet.stderr, quiet.stderr
    assert "recover" in quiet.stderr + quiet.stdout
    loud = _run("-v", *args, "--out", "b", cwd=job_dir)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Loading weights" in loud.stderr, loud.stderr


def test_the_stage_table_keeps_long_counts_left_aligned_without_trailing_blanks():
    """near_dedup's counts (one per cluster size) are long; right-aligned, they pushed every other
    stage's counts a screen to the right."""
    from curate.cli import summary

    stages = {"read": {"busy_s": 7.0, "rows_per_busy_s": 14192.4, "rows": 100000},
              "near_dedup": {"busy_s": 1.0, "rows_per_busy_s": 89314.5, "dropped": 9052,
                             **{f"clusters:size_{k}": 10 * k for k in range(2, 30)}}}
    man = {"job": {"name": "t"}, "timing": {"wall_s": 1.0},
           "accounting": {"rows_in": 1, "selected": 1, "dropped": 0, "rejected": 0, "holds": True},
           "counts": {"dropped": {}, "rejected": {}, "by_source": {"s": {"rows_in": 1, "selected": 1, "dropped": {},
                                                                         "rejected": {}}}},
           "stages": stages}
    lines = summary(man).splitlines()
    read = next(line for line in lines if line.startswith("read "))
    near = next(line for line in lines if line.startswith("near_dedup "))
    assert read.endswith("rows=100,000") and read.index("rows=") == near.index("dropped=")
    assert all(line == line.rstrip() for line in lines)
