"""The converted-model cache is published by one folder rename (``curate.models._publish``): a
reader never sees half of it, two first runs at once keep one copy, an incomplete older cache is
replaced. Plain files stand in for the weights (the real conversion runs in the IFD tests)."""
import os

from curate.models import _publish


def _folder(path, text):
    os.makedirs(path)
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(path, name), "w") as fh:
            fh.write(f"{name} {text}")
    return str(path)


def _read(path):
    return {n: open(os.path.join(path, n)).read() for n in sorted(os.listdir(path))}


def test_the_first_of_two_processes_wins_and_the_second_is_cleaned_up(tmp_path):
    dest = str(tmp_path / "smollm2-abc")
    first, second = _folder(f"{dest}.tmp-1", "first"), _folder(f"{dest}.tmp-2", "second")
    assert _publish(first, dest, "model.safetensors") is True
    assert _publish(second, dest, "model.safetensors") is False
    assert _read(dest)["model.safetensors"] == "model.safetensors first"
    assert sorted(os.listdir(tmp_path)) == ["smollm2-abc"]  # neither temporary folder is left


def test_an_incomplete_older_cache_is_replaced(tmp_path):
    dest = tmp_path / "smollm2-abc"
    dest.mkdir()
    (dest / "config.json").write_text("half written by an older version: no weights")
    new = _folder(f"{dest}.tmp-7", "new")
    assert _publish(new, str(dest), "model.safetensors") is True
    assert _read(dest) == {"config.json": "config.json new", "model.safetensors": "model.safetensors new"}
    assert sorted(os.listdir(tmp_path)) == ["smollm2-abc"]
