import pytest

from curate.dedup.exact import dedup_key, resolve_group
from curate.ids import resolve_ids


def _rec(id_, source="a", prompt="p", response="r", original=None):
    return {"id": id_, "source": source, "prompt": prompt, "response": response,
            "original": original or f'{{"id":"{id_}"}}'}


def test_key_normalizes_case_space_and_unicode():
    assert dedup_key("Hello  World", "ＯＫ", "a") == dedup_key(" hello world\n", "ok", "b")
    assert dedup_key("a", "bc", "s") != dedup_key("ab", "c", "s")  # the separator matters
    assert dedup_key("a", "b", "x", "source") != dedup_key("a", "b", "y", "source")


def test_keep_rule_source_order_then_smallest_id_whatever_the_order():
    rank = {"first": 0, "second": 1}
    group = [_rec("b", "first"), _rec("a", "second"), _rec("c", "first")]
    for order in (group, list(reversed(group))):
        out = resolve_group([dict(r) for r in order], rank)
        kept = [r["id"] for r in out if r["exact_dup_of"] is None]
        assert kept == ["b"]
        assert {r["id"]: r.get("drop_reason") for r in out} == {"a": "exact_duplicate", "b": None,
                                                                "c": "exact_duplicate"}
        assert all(r["exact_dup_of"] in (None, "b") for r in out)


def test_identical_content_ids_are_numbered():
    recs = [_rec("h", original="same"), _rec("h", original="same"), _rec("h", original="same")]
    kept, rejects = resolve_ids(recs, user_ids=False)
    assert sorted(r["id"] for r in kept) == ["h", "h#2", "h#3"] and rejects == []


def test_user_id_collision_with_different_content_rejects_the_later_content():
    recs = [_rec("7", original='{"x":2}'), _rec("7", original='{"x":1}'), _rec("7", original='{"x":1}')]
    kept, rejects = resolve_ids(recs, user_ids=True)
    assert sorted(r["id"] for r in kept) == ["7", "7#2"]
    assert all(r["original"] == '{"x":1}' for r in kept)
    assert [r["reason"] for r in rejects] == ["duplicate_id"]


@pytest.mark.parametrize("scope", ["global", "source"])
def test_keys_of_a_batch_in_columns_are_each_rows_key(scope):
    """ASCII rows take the column operations, the others normalize_text: every white space Python
    splits on (\\x0b, \\x1c-\\x1f, \\x85, \\u3000), case folding beyond lowering (ß), NFKC (ﬁ)."""
    import random

    import pyarrow as pa

    from curate.dedup.exact import dedup_keys

    parts = ["A  b\tC\n", " x\x1cy ", "Straße ﬁ", "", "  ", "a\x0bb\x85c", "Ünï", "q\u3000r", "\x1f", "a b",
             " \t ", "MiXeD\r\ncase"]
    rng = random.Random(0)
    prompts = [rng.choice(parts) + rng.choice(parts) for _ in range(600)]
    responses = [rng.choice(parts) + rng.choice(parts) for _ in range(600)]
    got = dedup_keys(pa.array(prompts), pa.array(responses), "src", scope)
    assert got.dtype == "S16" and len(got) == 600
    assert [bytes(k) for k in got.view("V16")] == [bytes.fromhex(dedup_key(p, r, "src", scope))
                                                  for p, r in zip(prompts, responses)]
    assert sum(p.isascii() and r.isascii() for p, r in zip(prompts, responses)) > 100
