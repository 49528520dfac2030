"""Selective Reflection-Tuning (Li et al., ACL 2024 Findings; methods.md §3): a teacher reflects on
a row's instruction and on its response, and the student (our IFD / r-IFD scores) accepts a
rewrite only when it makes the pair harder and better aligned.

Prompts are in our own words and ask for the papers' criteria. Parsing is strict where the
reference is loose (§3.4): a block ends only at ``[End]`` or at the next tag (never at "End"
inside a word such as "Endpoint"), a reply that holds a placeholder, ``N/A`` or no block is a
parse failure, and an instruction reflection whose instruction or answer fails is dropped as a
pair (never the original instruction with an answer written for a new one). Pure functions.
"""
from __future__ import annotations

import math
import re

import pyarrow as pa

from curate.columns import Column, StageColumns

TEMPLATE_VERSION = "reflection-v1"  # part of every request's cache key: change it when a prompt changes

INSTRUCTION_SYSTEM = ("You review instruction-tuning data with a careful, demanding eye for the quality of "
                      "instructions.")
PAIR = """Here is an instruction and the answer it received.

[Instruction]
{instruction}
[End]

[Answer]
{answer}
[End]

"""  # what both reflections are shown
INSTRUCTION_PROMPT = PAIR + """\
1. Judge the instruction: how complex its topic is, how much detail it asks for, what knowledge it needs, \
whether it is ambiguous, and how much reasoning or problem solving it takes. Judge the answer: how helpful, \
relevant, accurate and detailed it is. Say how weaknesses of the instruction led to weaknesses of the answer.
2. Write one new instruction, related to the original but harder and complete on its own (it must make sense \
without the original). Put it between [New Instruction] and [End].
3. Answer the new instruction in full detail. Put the answer between [New Answer] and [End]."""

RESPONSE_SYSTEM = "You review instruction-tuning data with a careful, demanding eye for the quality of answers."
RESPONSE_PROMPT = PAIR + """\
1. Judge the answer: how helpful, relevant, accurate and detailed it is.
2. Write a better answer to the same instruction: complete, correct and detailed. Put it between \
[Better Answer] and [End]."""

COLUMNS = StageColumns("rewrite.reflection", ("rewrite.reflection.enabled",), (
    Column("rewrite_kind", pa.string(), "the variant the row now holds: ori (unchanged), A (the teacher's better "
                                        "answer) or QA (a harder instruction and its improved answer)"),
    Column("rewrite_status", pa.string(), "accepted, kept_original (the student took no rewrite), parse_failed "
                                          "(no usable rewrite), teacher_failed (a request failed after retries: "
                                          "see rewrite_failures/) or not_applicable (multi-turn)"),
    Column("original_prompt", pa.string(), "the prompt before the rewrite step"),
    Column("original_response", pa.string(), "the response before the rewrite step"),
    Column("rewrite_scores", pa.string(), "JSON: the student's [IFD, r-IFD] of each variant it scored (ori, Q, A, "
                                          "QA); null where the score was NaN"),
))
PLACEHOLDERS = ("your instruction", "your answer", "new instruction here", "new answer here")
_TAG = r"\[(?:New Instruction|New Answer|Better Answer|End)\]"


def instruction_messages(instruction: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": INSTRUCTION_SYSTEM},
            {"role": "user", "content": INSTRUCTION_PROMPT.format(instruction=instruction, answer=answer)}]


def response_messages(instruction: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": RESPONSE_SYSTEM},
            {"role": "user", "content": RESPONSE_PROMPT.format(instruction=instruction, answer=answer)}]


def blocks(text: str, tag: str) -> list[str]:
    """Every ``[tag] ... `` block's text, each ending at ``[End]``, at the next bracketed tag or at
    the end of the reply; stripped."""
    pattern = re.compile(r"\[" + re.escape(tag) + r"\](.*?)(?=" + _TAG + r"|\Z)", re.DOTALL)
    return [m.group(1).strip() for m in pattern.finditer(text)]


def _usable(text: str | None) -> bool:
    if not text:
        return False
    low = text.lower()
    return text.strip().upper() != "N/A" and not any(p in low for p in PLACEHOLDERS)


def parse_instruction_reflection(text: str) -> tuple[str, str] | None:
    """(new instruction, new answer), or None when either is missing or unusable: the pair is
    dropped together."""
    instructions, answers = blocks(text, "New Instruction"), blocks(text, "New Answer")
    if len(instructions) != 1 or len(answers) != 1:
        return None
    pair = (instructions[0], answers[0])
    return pair if all(_usable(x) for x in pair) else None


def parse_response_reflection(text: str) -> str | None:
    """The better answer, or None when there is not exactly one usable ``[Better Answer]`` block.
    Two blocks are ambiguous (the reference takes the first); we take neither."""
    answers = blocks(text, "Better Answer")
    return answers[0] if len(answers) == 1 and _usable(answers[0]) else None


VARIANTS = ("ori", "Q", "A", "QA")


def decide(scores: dict[str, tuple[float, float]]) -> str | None:
    """The variant the student keeps (methods.md §3.1 step 8), from ``{variant: (ifd, rifd)}``;
    None keeps the original row. A variant that is missing or has a NaN score never wins (the
    reference's failed score of 0 passed every ``< 1`` test)."""
    def ok(v):
        return v in scores and all(not math.isnan(x) for x in scores[v])

    if not ok("ori"):
        return None
    ifd, rifd = {v: scores[v][0] for v in scores}, {v: scores[v][1] for v in scores}
    if ok("Q") and ifd["Q"] > ifd["ori"]:  # the new instruction is harder: go on from it
        if ok("QA") and rifd["QA"] < rifd["Q"] and rifd["QA"] < 1 and ifd["QA"] < 1:
            return "QA"
        return None
    if ok("A") and rifd["A"] < rifd["ori"] and rifd["A"] < 1 and ifd["A"] < 1:
        return "A"
    return None

