"""The demo job on a slice of the bundled sample (20 rows a source, every stage at its demo
setting, the real models) gives the selection and the score columns recorded from the code
before the stage kit refactor (tests/golden/extract.py wrote demo_head20.json; re-recorded once
since, when facility location began to treat gains within float noise as ties: nq:1 for nq:15,
two near-identical rows, every score unchanged). Scores may differ slightly on another CPU's
kernels (up to 1.1e-4 relative for ifd_ppl, 1e-5 for the NLLs, between AVX-512 and oneDNN/MKL/ATen
capped at AVX2); ids, statuses and reasons must not."""
import json
import math
import os

from tests.conftest import REPO, run_cli
from tests.golden.extract import SCORES, summary


def test_demo_slice_matches_the_golden_selection_and_scores(job_dir):
    demo = os.path.join(REPO, "pipelines", "jobs", "demo.yaml")
    with open(os.path.join(REPO, "tests", "golden", "demo_head20.json"), encoding="utf-8") as fh:
        golden = json.load(fh)
    os.symlink(os.path.join(REPO, "examples"), job_dir / "examples")  # the job's relative input paths
    assert run_cli("run", demo, "--set", "output=out", "--set", "sample.mode=head", "--set", "sample.n=20",
                   "--set", f"score.ifd.cache_dir={job_dir / 'scores'}",
                   "--set", f"embed.cache_dir={job_dir / 'embeddings'}") == 0
    got = summary("out")
    assert got["selected"] == golden["selected"]
    assert got["rows"].keys() == golden["rows"].keys()
    for rid, want in golden["rows"].items():
        have = got["rows"][rid]
        assert have["drop_reason"] == want["drop_reason"], rid
        for c in SCORES:
            if isinstance(want[c], float):
                assert math.isclose(have[c], want[c], rel_tol=5e-4, abs_tol=1e-9), (rid, c, have[c], want[c])
            else:
                assert have[c] == want[c], (rid, c)
