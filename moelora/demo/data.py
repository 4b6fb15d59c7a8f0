"""The demo's three small text tasks, generated deterministically from templates and a seed.

- ``sentiment`` (2 classes): reviews with negation ("the film was not great") and contrast
  ("i expected the film to be awful , but it was great"); the label is the polarity of
  the final judgement, so the words present do not decide it by themselves.
- ``topic`` (4 classes: sports, food, technology, weather): sentences about two topic words.
- ``similarity`` (2 classes): does sentence b describe the same event as sentence a?
  Paraphrases change the voice ("the dog chased the cat" / "the cat was chased by the
  dog"); most non-paraphrases swap the roles, so both sentences hold the same words.

Label-bearing words (adjectives, topic words, verbs) are shared by both splits; the filler
words (what is reviewed, who talks, who acts) are disjoint between the train and the eval
split, so eval sentences are never seen in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

TASKS = ("sentiment", "topic", "similarity")
NUM_CLASSES = {"sentiment": 2, "topic": 4, "similarity": 2}
LABEL_NAMES = {
    "sentiment": ("negative", "positive"),
    "topic": ("sports", "food", "technology", "weather"),
    "similarity": ("different", "same event"),
}

# ----------------------------------------------------------------------------- sentiment
POSITIVE = ("great", "wonderful", "excellent", "delightful", "fantastic", "lovely", "superb", "pleasant",
            "brilliant", "charming", "enjoyable", "amazing")
NEGATIVE = ("terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "miserable", "dull",
            "poor", "unpleasant", "mediocre", "annoying")
REVIEWED_TRAIN = ("movie", "meal", "concert", "book", "hotel", "service", "trip", "show", "game", "album",
                  "lecture", "party", "museum", "coffee")
REVIEWED_EVAL = ("film", "restaurant", "play", "class", "product", "room", "festival", "novel")
# (template, negated): {x} is what is reviewed, {adj} the judgement, {other} an adjective of the
# opposite polarity that the sentence rejects.
SENTIMENT_TEMPLATES = (
    ("the {x} was {adj} .", False),
    ("honestly , the {x} was really {adj} .", False),
    ("everyone agreed that the {x} was {adj} .", False),
    ("i expected the {x} to be {other} , but it was {adj} .", False),
    ("the {x} seemed {other} at first , but in the end it was {adj} .", False),
    ("the {x} was not {adj} .", True),
    ("i would not say that the {x} was {adj} .", True),
    ("nobody thought the {x} was {adj} .", True),
    ("the {x} was {other} , not {adj} .", True),
)

# ----------------------------------------------------------------------------- topic
TOPIC_WORDS = (
    ("football", "tennis", "goalkeeper", "referee", "tournament", "marathon", "basketball", "stadium",
     "coach", "championship", "hockey", "sprinter"),
    ("pasta", "recipe", "bakery", "chef", "soup", "dessert", "omelette", "kitchen", "spices", "sandwich",
     "pizza", "vegetables"),
    ("laptop", "software", "processor", "smartphone", "database", "algorithm", "keyboard", "browser",
     "server", "compiler", "robot", "battery"),
    ("thunderstorm", "rain", "forecast", "snowfall", "humidity", "hurricane", "drought", "fog",
     "temperature", "wind", "sunshine", "frost"),
)
SPEAKERS_TRAIN = ("my neighbour", "the teacher", "our manager", "his sister", "a journalist", "the mayor",
                  "my uncle", "the student", "her cousin", "a stranger")
SPEAKERS_EVAL = ("my grandmother", "the dentist", "our landlord", "their friend", "a tourist", "the captain")
TOPIC_TEMPLATES = (
    "{who} wrote a long post about the {w1} and the {w2} .",
    "{who} keeps talking about the {w1} .",
    "yesterday {who} asked me about the {w1} and the {w2} .",
    "the report by {who} on the {w1} also mentioned the {w2} .",
    "{who} could not stop thinking about the {w1} .",
)

# ----------------------------------------------------------------------------- similarity
VERBS = ("chased", "followed", "helped", "called", "watched", "pushed", "visited", "thanked", "blamed",
         "greeted", "admired", "warned")
ACTORS_TRAIN = ("dog", "cat", "teacher", "doctor", "farmer", "pilot", "lion", "rabbit", "student", "nurse",
                "soldier", "baker")
ACTORS_EVAL = ("horse", "fox", "lawyer", "singer", "monkey", "driver", "wolf", "tailor")
# Surface forms of the event "a <verb> b".
EVENT_FORMS = (
    "the {a} {v} the {b} .",
    "the {b} was {v} by the {a} .",
    "it was the {a} that {v} the {b} .",
)


@dataclass(frozen=True)
class Example:
    task: int  # index into TASKS
    texts: Tuple[str, ...]  # one sentence, or a pair for the similarity task
    label: int


def _sentiment(rng: random.Random, reviewed: Sequence[str]) -> Example:
    template, negated = rng.choice(SENTIMENT_TEMPLATES)
    positive = rng.random() < 0.5  # the polarity of the adjective the sentence asserts or denies
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    other = rng.choice(NEGATIVE if positive else POSITIVE)
    text = template.format(x=rng.choice(reviewed), adj=adj, other=other)
    return Example(TASKS.index("sentiment"), (text,), int(positive != negated))


def _topic(rng: random.Random, speakers: Sequence[str]) -> Example:
    label = rng.randrange(len(TOPIC_WORDS))
    w1, w2 = rng.sample(TOPIC_WORDS[label], 2)
    text = rng.choice(TOPIC_TEMPLATES).format(who=rng.choice(speakers), w1=w1, w2=w2)
    return Example(TASKS.index("topic"), (text,), label)


def _event(rng: random.Random, a: str, verb: str, b: str, exclude: Optional[str] = None) -> str:
    forms = [f for f in EVENT_FORMS if f != exclude]
    return rng.choice(forms).format(a=a, v=verb, b=b)


def _similarity(rng: random.Random, actors: Sequence[str]) -> Example:
    a, b, c = rng.sample(actors, 3)
    verb = rng.choice(VERBS)
    first_form = rng.choice(EVENT_FORMS)
    first = first_form.format(a=a, v=verb, b=b)
    same = rng.random() < 0.5
    if same:  # the same event in another voice or form
        second = _event(rng, a, verb, b, exclude=first_form)
    else:
        kind = rng.random()
        if kind < 0.6:  # roles swapped: the same words, another event
            second = _event(rng, b, verb, a)
        elif kind < 0.8:  # another participant
            second = _event(rng, a, verb, c) if rng.random() < 0.5 else _event(rng, c, verb, b)
        else:  # another action
            second = _event(rng, a, rng.choice([v for v in VERBS if v != verb]), b)
    return Example(TASKS.index("similarity"), (first, second), int(same))


def make_split(split: str, per_task: int, seed: int) -> List[Example]:
    """``per_task`` examples of every task for ``split`` ("train" or "eval"), task-interleaved."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train = split == "train"
    rng = random.Random(f"{seed}-{split}")
    makers = (
        lambda: _sentiment(rng, REVIEWED_TRAIN if train else REVIEWED_EVAL),
        lambda: _topic(rng, SPEAKERS_TRAIN if train else SPEAKERS_EVAL),
        lambda: _similarity(rng, ACTORS_TRAIN if train else ACTORS_EVAL),
    )
    return [make() for _ in range(per_task) for make in makers]


def make_datasets(train_per_task: int, eval_per_task: int, seed: int) -> Dict[str, List[Example]]:
    return {"train": make_split("train", train_per_task, seed), "eval": make_split("eval", eval_per_task, seed)}


def all_words() -> List[str]:
    """Every word a template or word list can produce (a vocabulary covering both splits)."""
    templates = [t for t, _ in SENTIMENT_TEMPLATES] + list(TOPIC_TEMPLATES) + list(EVENT_FORMS)
    word_lists = (REVIEWED_TRAIN, REVIEWED_EVAL, POSITIVE, NEGATIVE, SPEAKERS_TRAIN, SPEAKERS_EVAL, VERBS,
                  ACTORS_TRAIN, ACTORS_EVAL) + TOPIC_WORDS
    words = {w for t in templates for w in t.split() if not w.startswith("{")}
    words.update(w for entries in word_lists for entry in entries for w in entry.split())
    return sorted(words)
