"""Prompts over passages the target writes (``pyramid distill corpus --passages F``).

Held-out prompts of the summarisation, retrieval and translation kinds carry a passage of several
sentences (an e-mail, a policy, an article), and the answers copy and condense it. Short prompts the
target writes about itself teach none of that. Here the target first writes a passage (a genre of
``GENRES`` about a topic), sampled; the passage then becomes the body of a task prompt
(``TASKS``: summarise it, answer a question on it, translate its opening, edit it), which the corpus
answers like any other prompt. The written passage is itself a sampled answer with teacher rows, so
the corpus keeps it as a training sequence too.
"""

from __future__ import annotations

import random
import re

__all__ = ["GENRES", "TASKS", "LANGUAGES", "passage_task", "trim_passage"]

# What the target is asked to write ({t}: a topic of corpus._TOPICS).
GENRES: tuple[str, ...] = (
    "Write a short news report about {t}.",
    "Write an e-mail to your colleagues about an event related to {t}. Give the date, the time and the place.",
    "Write a short encyclopedia entry about {t}.",
    "Write a short story that involves {t}.",
    "Write a product description for something related to {t}, with its price and features.",
    "Write a notice for a community newsletter about {t}, with names, dates and numbers.",
    "Write a paragraph that explains {t} to a student.",
    "Write a short opinion piece about {t}.",
    "Write the minutes of a club meeting about {t}.",
    "Write a short travel guide entry about a place known for {t}.",
    "Write a letter to a friend about {t}.",
    "Write a short report of a survey about {t}, with percentages.",
)

LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")

# Task prompts over a passage, per task kind: {p} the passage, {s} its first sentences, {w} a
# word from it, {lang} a language of LANGUAGES.
TASKS: dict[str, tuple[str, ...]] = {
    "summarisation": (
        "Summarise the following text in two sentences.\n\n{p}",
        "{p}\n\nWhat is the main idea of this text?",
        "Write a one-sentence summary of this passage:\n\n{p}",
        "Give three bullet points that summarise the text below.\n\n{p}",
    ),
    "retrieval": (
        "Read the text and answer the question.\n\nText: {p}\n\nQuestion: What does the text say about \"{w}\"?",
        "{p}\n\nUsing only the text above, list the names, dates and numbers it mentions.",
        "Context:\n{p}\n\nQuestion: Which sentence of the context mentions \"{w}\"? Quote it.",
    ),
    "translation": (
        "Translate into {lang}:\n{s}",
        "Translate the following text from English to {lang}.\n\n{s}",
    ),
    "qa": (
        "{p}\n\nWhat questions could a reader ask after reading this? Give three, with their answers.",
        "Here is a paragraph:\n\n{p}\n\nExplain what \"{w}\" means in it.",
    ),
    "chat": (
        "Here is something I wrote:\n\n{p}\n\nCan you make it sound more formal?",
        "Please correct any mistakes in this text and make it easier to read:\n\n{p}",
        "Suggest a good title for this text, and say why.\n\n{p}",
    ),
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{5,}")


def trim_passage(text: str, *, min_words: int = 30) -> str | None:
    """``text`` cut after its last full sentence, or ``None`` when fewer than ``min_words``
    words are left (a passage that ran out of tokens mid-sentence keeps its complete sentences)."""
    text = text.strip()
    end = max(text.rfind(c) for c in ".!?")
    if end < 0:
        return None
    text = text[: end + 1]
    return text if len(text.split()) >= min_words else None


def passage_task(kind: str, passage: str, rng: random.Random) -> str:
    """A task prompt of ``kind`` over ``passage`` (a template of ``TASKS[kind]`` chosen with ``rng``)."""
    template = rng.choice(TASKS[kind])
    sentences = _SENTENCE_END.split(passage)
    opening = " ".join(sentences[: rng.randint(1, 3)])
    words = _WORD.findall(passage)
    word = rng.choice(words) if words else sentences[0].split()[0]
    return template.format(p=passage, s=opening, w=word, lang=rng.choice(LANGUAGES))
