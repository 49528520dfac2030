import json
import os
import sys

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores for
# torch and BLAS, itself and the processes it starts: two workers at every core each would run
# four threads on two cores. Set before torch loads (it reads these once).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and not os.environ.get("OMP_NUM_THREADS"):
    from curate.device import usable_cores  # imports no torch

    _share = str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _share

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
EXAMPLES = os.path.join(REPO, "examples", "data")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def shared(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    assert os.path.isfile(path), f"shared data file missing: {path} (the repo expects ../shared/data beside it)"
    return path


def write_job(folder, cfg: dict, name: str = "job.yaml") -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return path


def run_cli(*argv) -> int:
    from curate.cli import main

    return main([str(a) for a in argv])


def load_manifest(out) -> dict:
    with open(os.path.join(str(out), "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)


def read_table(out, name: str):
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(str(out), name))


def ids(out, name: str = "selected") -> list[str]:
    return sorted(read_table(out, name).column("id").to_pylist())


@pytest.fixture(scope="session", autouse=True)
def fresh_caches(tmp_path_factory):
    """Score and embedding caches start empty in every test session (a developer's earlier runs
    must not turn model rows into cache hits); the converted model weights are shared, since
    converting the GGUF again would only cost time."""
    from curate.models import cache_root

    real = cache_root()
    root = tmp_path_factory.mktemp("curate-cache")
    os.makedirs(os.path.join(real, "models"), exist_ok=True)
    os.symlink(os.path.join(real, "models"), root / "models")
    old = os.environ.get("CURATE_CACHE")
    os.environ["CURATE_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CURATE_CACHE", None)
    else:
        os.environ["CURATE_CACHE"] = old


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    """A scratch folder that is also the working directory (relative paths resolve there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


NO_MODEL_STAGES = {"embed": {"enabled": False}, "cluster": {"enabled": False},
                   "dedup": {"semantic": {"enabled": False}}, "score": {"ifd": {"enabled": False}}}


def without_models(cfg: dict) -> dict:
    """A job config with the embedding, clustering and semantic-dedup stages off, for tests of
    other stages (those stages have their own tests)."""
    out = {**cfg}
    for key, sub in NO_MODEL_STAGES.items():
        if key in ("dedup", "score"):
            out[key] = {**out.get(key, {}), **sub}
        else:
            out[key] = {**sub, **out.get(key, {})}
    return out


def without_scores(cfg: dict) -> dict:
    """The IFD stage off (for tests of the embedding stages: the weak LM costs ~1 s a row on CPU)."""
    return {**cfg, "score": {"ifd": {"enabled": False}}}
