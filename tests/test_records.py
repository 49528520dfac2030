import pytest

from curate.records import (FieldMap, RowError, RowSpec, canonical_json, convert, normalize_text,
                            to_record)

ALPACA = RowSpec(source="s")


def test_alpaca_row_with_and_without_input():
    rec = to_record({"instruction": "Add", "input": "2 and 3", "output": "5"}, ALPACA)
    assert rec["prompt"] == "Add\n\n2 and 3"
    assert rec["response"] == "5"
    assert rec["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"},
                               {"role": "assistant", "content": "5"}]
    assert to_record({"instruction": "Add", "input": "  ", "output": "5"}, ALPACA)["prompt"] == "Add"
    assert to_record({"instruction": "Add", "output": "5"}, ALPACA)["prompt"] == "Add"


def test_messages_multi_turn_rule_last_assistant_is_response():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},  # unanswered: not part of prompt or response
    ]}
    rec = to_record(row, ALPACA)
    assert rec["response"] == "4"
    assert rec["prompt"] == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: 2+2?"
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_with_mapped_field_and_user_id():
    spec = RowSpec(source="nq", form="sharegpt", fields=FieldMap(conversations="items"), id_field="id")
    rec = to_record({"items": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "id": 7}, spec)
    assert (rec["id"], rec["prompt"], rec["response"]) == ("nq:7", "Q?", "A.")


def test_lima_conversations_are_plain_strings_taking_turns():
    spec = RowSpec(source="lima")
    rec = to_record({"conversations": ["Q?", "A."], "source": "stackexchange"}, spec)
    assert (rec["prompt"], rec["response"]) == ("Q?", "A.")
    rec = to_record({"conversations": ["Hi", "Hello", "Add 2 and 2.", "4", "Thanks"]}, spec)
    assert rec["response"] == "4" and rec["prompt"] == "User: Hi\n\nAssistant: Hello\n\nUser: Add 2 and 2."
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant", "user", "assistant"]
    for bad, reason in ((["Q?", {"from": "gpt", "value": "A."}], "bad_messages"), (["Q?"], "no_response"),
                        (["Q?", ""], "empty_response")):
        with pytest.raises(RowError) as err:
            to_record({"conversations": bad}, spec)
        assert err.value.reason == reason


def test_content_id_is_stable_and_depends_on_source_and_content():
    row = {"instruction": "a", "output": "b"}
    a = to_record(row, RowSpec(source="x"))["id"]
    assert a == to_record(dict(reversed(list(row.items()))), RowSpec(source="x"))["id"]  # key order
    assert a != to_record(row, RowSpec(source="y"))["id"]
    assert a != to_record({"instruction": "a", "output": "c"}, RowSpec(source="x"))["id"]
    assert len(a) == 32


@pytest.mark.parametrize("row, reason", [
    ([1, 2], "not_an_object"),
    ({"text": "x"}, "unknown_form"),
    ({"instruction": "x"}, "missing_field"),
    ({"instruction": "x", "output": 5}, "wrong_type"),
    ({"instruction": "x", "output": "   "}, "empty_response"),
    ({"instruction": " ", "output": "y"}, "empty_prompt"),
    ({"instruction": "x", "output": "y" * 200}, "too_long"),
    ({"instruction": "x\udcff", "output": "y"}, "undecodable_bytes"),
    ({"messages": "hello"}, "bad_messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_response"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "wrong_type"),
])
def test_bad_rows_get_reason_codes(row, reason):
    spec = RowSpec(source="s", max_chars=100)
    with pytest.raises(RowError) as err:
        to_record(row, spec)
    assert err.value.reason == reason
    kind, rej = convert(row, spec, "f.jsonl", 3)
    assert kind == "reject" and rej["reason"] == reason and rej["row_number"] == 3
    assert isinstance(rej["raw"], str) and rej["raw"]


def test_user_id_rules():
    spec = RowSpec(source="s", id_field="uid")
    assert convert({"instruction": "a", "output": "b"}, spec, "f", 1)[1]["reason"] == "missing_id"
    assert convert({"instruction": "a", "output": "b", "uid": 1.5}, spec, "f", 1)[1]["reason"] == "wrong_type"


def test_normalize_text():
    assert normalize_text("  Ｈello\tWORLD \n ﬁne ") == "hello world fine"
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
