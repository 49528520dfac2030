"""ReAlign (Fan et al., EMNLP 2024 Findings; methods.md §4): classify each row's task, ask the
teacher to reformat the response to that task's format without changing what it says, and keep
the reformatted response only when the post-filter finds nothing lost.

Ours, not the reference's: the formats are written per task group in our own words (the
reference has one per task); the task classifier is our sentence embeddings with a logistic
regression trained on the reference's classifier data (it used a fine-tuned 13B model), or the
teacher itself with that classifier as its fallback (``classify_messages``, ``parse_category``); a
category without a format passes through unchanged (the reference raises KeyError); the
single-character rule escapes the character (the reference's regex crashes on "(" and matches
anything on "."); a reply without "Revised response:" is a parse failure, never retried forever.
Pure functions, plus the classifier's fit and save.
"""
from __future__ import annotations

import re

import pyarrow as pa

from curate.columns import Column, StageColumns

TEMPLATE_VERSION = "realign-v1"
CATEGORIES = (
    "advice_giving", "closed_qa", "code_correction", "code_language_classification", "code_simplification",
    "code_to_code_translation", "code_to_text_translation", "data_generation", "default", "email_generation",
    "exam_problem_solving_tutor", "explain_answer", "explain_code", "fact_verification", "fill_in_the_blank",
    "general_classification", "how_to_generation", "information_extraction", "instructional_rewriting",
    "keywords_extraction", "language_classification", "language_learning_questions", "language_polishing",
    "math_puzzles", "ml_ai_language_model_tutor", "natural_language_learning_tutor", "note_summarization", "open_qa",
    "ordering", "paraphrasing", "planning", "poem_generation", "question_generation", "recommendations",
    "rejecting", "roleplay", "sentiment_analysis", "story_generation", "table_extraction", "text_correction",
    "text_summarization", "text_to_code_translation", "text_to_text_translation", "title_generation",
    "topic_classification", "value_judgement")
COLUMNS = StageColumns("rewrite.realign", ("rewrite.realign.enabled",), (
    Column("realign_category", pa.string(), "the task category of the instruction"),
    Column("realign_category_by", pa.string(), "who named it: classifier (the embedding classifier), teacher, "
                                               "classifier_after_unparsed_reply or classifier_after_failed_request "
                                               "(rewrite.realign.classifier: teacher fell back to the classifier)"),
    Column("realign_status", pa.string(), "rewritten, filtered (the post-filter kept the original: see "
                                          "realign_reason), unchanged_category (no format for it), parse_failed, "
                                          "teacher_failed (see rewrite_failures/) or not_applicable (multi-turn)"),
    Column("realign_reason", pa.string(), "the post-filter's verdict: ok, too_short, code_mismatch, lost_answer, "
                                          "kept_answer or true_false"),
))
# the reference leaves these as they are (free-form writing, where a fixed format does harm)
UNCHANGED = frozenset({"advice_giving", "code_simplification", "default", "note_summarization", "paraphrasing",
                       "poem_generation", "roleplay", "story_generation", "table_extraction", "text_summarization",
                       "title_generation"})

FORMATS = {
    "reasoning": ("Start with a short analysis of what is asked and what is given. Then solve it in numbered "
                  "steps, one operation or inference per step, showing intermediate values. End with a line "
                  "that states the final answer on its own."),
    "code": ("Start with one or two sentences on what the code must do. Give the code in one fenced code block "
             "with the language named. Then explain the important parts in a short bulleted list, and end "
             "with a sentence on how to use or test it."),
    "explain": ("Open with a direct one- or two-sentence answer. Follow with the explanation as a few short "
                "paragraphs or a bulleted list of the key points, each point one idea, and close with a "
                "one-sentence summary."),
    "short_answer": ("Give the answer itself first, in one sentence. Then add at most a short paragraph of "
                     "supporting explanation or context; do not pad."),
    "label": ("State the chosen label or category first, exactly as it should be read. Then give a brief "
              "justification that points to the words or features of the input that decide it."),
    "steps": ("Begin with one sentence on the goal. Then give the steps as a numbered list, each step starting "
              "with a verb and saying what to do and why. End with tips or pitfalls as a short bulleted list "
              "if they help."),
    "list": ("Introduce the list in one sentence. Give the items as a numbered or bulleted list, each item with "
             "a short reason or detail. End with a one-sentence conclusion."),
    "email": ("Write it as an email: a subject line, a greeting, a short opening that states the purpose, a "
              "body in short paragraphs, a clear request or next step, a closing and a signature placeholder."),
    "text_edit": ("Give the revised text first, complete, set apart from the rest. Then list the changes that "
                  "matter, each with a brief reason."),
    "tutor": ("Explain like a patient tutor: restate the question, explain the idea needed with a small "
              "example, work through the question, and end with the answer and a one-line takeaway."),
    "refusal": ("Say clearly and politely that the request cannot be done as asked and why, in a sentence or "
                "two, and offer a safe, useful alternative if one exists."),
}
GROUP = {
    "math_puzzles": "reasoning", "exam_problem_solving_tutor": "tutor", "fill_in_the_blank": "short_answer",
    "code_correction": "code", "code_to_code_translation": "code", "text_to_code_translation": "code",
    "explain_code": "explain", "code_to_text_translation": "explain", "code_language_classification": "label",
    "closed_qa": "short_answer", "open_qa": "explain", "explain_answer": "explain", "fact_verification": "label",
    "value_judgement": "explain", "general_classification": "label", "topic_classification": "label",
    "sentiment_analysis": "label", "language_classification": "label", "how_to_generation": "steps",
    "planning": "steps", "ordering": "list", "recommendations": "list", "question_generation": "list",
    "data_generation": "list", "keywords_extraction": "list", "information_extraction": "list",
    "email_generation": "email", "language_polishing": "text_edit", "text_correction": "text_edit",
    "instructional_rewriting": "text_edit", "text_to_text_translation": "text_edit",
    "language_learning_questions": "tutor", "natural_language_learning_tutor": "tutor",
    "ml_ai_language_model_tutor": "tutor", "rejecting": "refusal",
}

# what each category holds, in our words, for a teacher that classifies (``classifier: teacher``)
DESCRIPTIONS = {
    "advice_giving": "asks for personal, practical or professional advice",
    "closed_qa": "a question answered from a passage or facts given in the request",
    "code_correction": "find and fix the bugs or errors in given code",
    "code_language_classification": "say which programming language a piece of code is written in",
    "code_simplification": "make given code shorter, cleaner or simpler without changing what it does",
    "code_to_code_translation": "rewrite code from one programming language in another",
    "code_to_text_translation": "describe given code in prose or pseudocode (documentation, comments)",
    "data_generation": "make up sample data, examples or records in a given shape",
    "default": "none of the other categories fits",
    "email_generation": "write an email or a letter",
    "exam_problem_solving_tutor": "solve an exam or homework problem from a school subject, with the working",
    "explain_answer": "explain a concept, process or why something is so",
    "explain_code": "explain what given code does and how it works",
    "fact_verification": "check whether a statement or claim is true",
    "fill_in_the_blank": "fill the gap in a sentence or text",
    "general_classification": "put given items into given classes or groups",
    "how_to_generation": "how to do or make something",
    "information_extraction": "pull specific facts, names or fields out of a given text",
    "instructional_rewriting": "rewrite a text to a new style, tone, audience or length as instructed",
    "keywords_extraction": "list the key words or phrases of a text",
    "language_classification": "say which human language a text is in",
    "language_learning_questions": "questions about a human language: grammar, meaning or use of words",
    "language_polishing": "improve the wording, fluency or style of a text",
    "math_puzzles": "arithmetic, math word problems, unit conversions and puzzles",
    "ml_ai_language_model_tutor": "teach a machine learning, AI or language model concept",
    "natural_language_learning_tutor": "act as a tutor for learning a human language",
    "note_summarization": "turn material into notes or bullet points",
    "open_qa": "a general knowledge question answered from what one knows",
    "ordering": "sort or rank items by some criterion",
    "paraphrasing": "say the same text in other words",
    "planning": "make a plan, schedule or itinerary",
    "poem_generation": "write a poem, song lyrics or verse",
    "question_generation": "write questions about a topic or text, or ask the user questions",
    "recommendations": "recommend or suggest things to choose (books, products, places, options)",
    "rejecting": "a harmful, unethical or impossible request that should be declined",
    "roleplay": "act as a character or persona",
    "sentiment_analysis": "say what feeling, opinion or intent a text expresses",
    "story_generation": "write a story, joke, dialogue or other creative prose",
    "table_extraction": "put information into a table or read it from one",
    "text_correction": "correct the spelling, grammar or punctuation of a text",
    "text_summarization": "summarize a text",
    "text_to_code_translation": "write code, a query or a command that does what is described",
    "text_to_text_translation": "translate a text from one human language to another",
    "title_generation": "write a title or headline",
    "topic_classification": "say what topic or subject a text is about",
    "value_judgement": "give an opinion or judge what is better, right or preferable",
}
CLASSIFY_TEMPLATE_VERSION = "realign-classify-v1"
CLASSIFY_SYSTEM = ("You sort user requests into task categories. Reply with the name of the one category that fits "
                   "the request best, exactly as written in the list, and nothing else.")
CLASSIFY_PROMPT = """Categories:
{categories}

Request:
{question}

Category name:"""


def classify_messages(question: str) -> list[dict]:
    """The teacher's classification request: the 46 names with what each holds, then the request."""
    listed = "\n".join(f"- {name}: {DESCRIPTIONS[name]}" for name in CATEGORIES)
    return [{"role": "system", "content": CLASSIFY_SYSTEM},
            {"role": "user", "content": CLASSIFY_PROMPT.format(categories=listed, question=question)}]


def _name_pattern(name: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9_])" + r"[ _-]".join(map(re.escape, name.split("_"))) + r"(?![a-z0-9_])")


_NAMES = {name: _name_pattern(name) for name in CATEGORIES}


def parse_category(reply: str | None) -> str | None:
    """The category a classification reply names, or None. The reply alone (quotes, a trailing
    period, spaces for underscores allowed) is taken; otherwise exactly one category name must
    occur in it. A reply naming several, or none, is not guessed at: the classifier's label is used."""
    if not reply:
        return None
    text = reply.strip().lower()
    whole = re.sub(r"[\s-]+", "_", text.strip(" \t\n`'\"*.:"))
    if whole in _NAMES:
        return whole
    spans = [(m.start(), m.end(), name) for name, pattern in _NAMES.items() for m in pattern.finditer(text)]
    # "code_language_classification" holds "language_classification": a match inside a longer one is not one
    found = {name for a, b, name in spans if not any(x <= a and b <= y and (x, y) != (a, b) for x, y, _ in spans)}
    return found.pop() if len(found) == 1 else None


SYSTEM = ("You rewrite the format of an assistant's answer. First judge whether the given format suits the "
          "question; if it does not, copy the answer unchanged. Otherwise change only the form: keep every fact, "
          "number, piece of code and conclusion, add nothing new, and make sure the question is still answered "
          "correctly. Write fluently and do not add headings the format does not ask for.")
PROMPT = """[Question start]
{question}
[Question end]

[Response start]
{response}
[Response end]

[Format start]
{format}
[Format end]

Reply with "Reasoning:" followed by your judgement of the format, then "Revised response:" followed by \
the answer in its new form."""


def format_for(category: str) -> str | None:
    """The category's format, or None when the row stays as it is (unchanged or unknown category)."""
    if category in UNCHANGED or category not in GROUP:
        return None
    return FORMATS[GROUP[category]]


def messages(question: str, response: str, category: str) -> list[dict] | None:
    fmt = format_for(category)
    if fmt is None:
        return None
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT.format(question=question, response=response, format=fmt)}]


def parse(reply: str) -> str | None:
    """The revised response, or None when the reply has no non-empty ``Revised response:`` part."""
    if "Revised response:" not in reply:
        return None
    text = reply.split("Revised response:", 1)[1].strip()
    return text or None


def has_code(text: str) -> bool:
    return "```" in text or ("def " in text and "return " in text)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def keep_rewrite(original: str, rewrite: str, count_tokens, min_ratio: float = 0.5,
                 short_words: int = 8) -> tuple[bool, str]:
    """(keep, reason): ReAlign's post-filter (the Open-Platypus composite, methods.md §4.1) with
    one rule of ours. A one-character answer must survive as a standalone character; True/False
    answers pass; ours: a short answer (at most ``short_words`` words; one of its lines, when it
    lists alternatives) must appear in the rewrite, case and spacing aside, or the rewrite lost the
    answer; then code must stay code (or stay absent) and the rewrite must keep more than
    ``min_ratio`` of the original's tokens. ``count_tokens(text)``: the student's token count."""
    stripped = original.strip()
    if len(stripped) == 1:
        found = re.search(r"(?<![A-Za-z])" + re.escape(stripped) + r"(?![A-Za-z])", rewrite)
        return (True, "kept_answer") if found else (False, "lost_answer")
    if stripped in ("True", "False"):
        return True, "true_false"
    if len(stripped.split()) <= short_words:
        answers = [_norm(line) for line in stripped.splitlines() if line.strip()]
        if not any(a in _norm(rewrite) for a in answers):
            return False, "lost_answer"
    if has_code(original) != has_code(rewrite):
        return False, "code_mismatch"
    if count_tokens(rewrite) <= min_ratio * count_tokens(original):
        return False, "too_short"
    return True, "ok"


class TaskClassifier:
    """Task category from the instruction: sentence embeddings, then a logistic regression. An
    instruction whose best probability is under ``min_prob`` is ``default``, as is any label the
    model was not trained on."""

    def __init__(self, model=None, min_prob: float = 0.0):
        self.model, self.min_prob = model, min_prob

    def fit(self, vectors, labels, c: float = 4.0, seed: int = 0) -> TaskClassifier:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(vectors, labels)
        return self

    def predict(self, vectors) -> list[str]:
        prob = self.model.predict_proba(vectors)
        best = prob.argmax(axis=1)
        out = []
        for row, k in zip(prob, best):
            label = str(self.model.classes_[k])
            out.append(label if row[k] >= self.min_prob and label in CATEGORIES else "default")
        return out

    def save(self, path: str) -> None:
        import pickle

        with open(path, "wb") as fh:
            pickle.dump({"model": self.model, "min_prob": self.min_prob, "format": 1}, fh)

    @classmethod
    def load(cls, path: str) -> TaskClassifier:
        import pickle

        with open(path, "rb") as fh:
            data = pickle.load(fh)
        return cls(data["model"], data["min_prob"])


def read_labelled(path: str) -> tuple[list[str], list[str]]:
    """(instructions, categories) of a classifier file: a JSON list (or JSON lines) of
    ``{instruction, category}``."""
    import json

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    lines = [x for x in text.splitlines() if x.strip()]
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in lines]
    bad = [i for i, r in enumerate(rows)
           if not isinstance(r, dict) or not r.get("instruction") or not r.get("category")]
    if bad:
        raise ValueError(f"{path}: row {bad[0] + 1} is not an {{instruction, category}} object")
    return [r["instruction"] for r in rows], [r["category"] for r in rows]


def evaluate(clf: TaskClassifier, vectors, labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    predicted = clf.predict(vectors)
    return {"rows": len(labels), "accuracy": round(float(accuracy_score(labels, predicted)), 4),
            "macro_f1": round(float(f1_score(labels, predicted, average="macro", zero_division=0)), 4)}
