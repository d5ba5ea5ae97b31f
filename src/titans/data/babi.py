"""bAbI tasks qa1-qa5 (Weston et al. 2015), generated in Python with answers correct by construction.

A re-implementation of the task logic of ``facebookarchive/bAbI-tasks`` (``WhereIsActor``, ``WhereIsObject``,
``WhereWasObject``, ``IsDir``, ``WhoWhatGave``) with the surface forms of the released v1.2 data
("Mary moved to the bathroom.", "Where is Mary?"). No registry ships bAbI, so BABILong's facts come from here.

A :class:`World` holds the true state (where every actor and object is, who holds what) and what the story has
told so far, with the story line that told each piece: questions are only asked about what the story
determines, and their supporting facts are those lines.

Departures from the Lua generator, for answers that are right and unambiguous: qa2 also asks about dropped
objects (two facts: the dropper's move and the drop); qa3 asks "before the L" only when every visit of L follows
the same location; qa5 asks about a give after 0-5 statements without gives (the Lua code reshuffles the
statements since the last question instead); gives need giver and receiver in the same place.

Stories use the released file format (:func:`format_story`): numbered lines restarting at 1 per story, questions
as ``"{n} {question} \\t{answer}\\t{support line numbers}"``. :func:`parse_babi` reads that format into
single-question samples the way BABILong's ``TaskDataset`` does, so real bAbI files work too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "TASKS",
    "ACTORS",
    "QA5_ACTORS",
    "LOCATIONS",
    "OBJECTS",
    "DIRECTIONS",
    "World",
    "Located",
    "StoryLine",
    "Story",
    "BabiSample",
    "generate_story",
    "babi_sample",
    "format_story",
    "parse_babi",
]

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
ACTORS = ("Daniel", "John", "Mary", "Sandra")
QA5_ACTORS = ("Bill", "Fred", "Jeff", "Mary")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}  # direction -> opposite

MOVE_VERBS = ("moved", "went", "journeyed", "travelled", "went back")
GET_VERBS = ("got", "grabbed", "picked up", "took")
DROP_VERBS = ("dropped", "discarded", "put down", "left")
GIVE_VERBS = ("gave", "handed", "passed")

QUESTIONS_PER_STORY = 5


@dataclass(frozen=True)
class Located:
    """A location the story determines, and the numbers of the story lines that determine it."""

    location: str
    support: frozenset[int]


@dataclass
class World:
    """True state of actors and objects plus what the story has told, with supporting line numbers.

    The story knows an actor's location once it has moved. It knows an object's location from the moment an
    actor with a known location holds it, or an actor carrying it moves; from then on every change of the
    object's location is a move of its holder, which the story tells, so the known history stays exact.
    """

    actors: tuple[str, ...]
    location: dict[str, str]  # true location of every actor and every object on the floor
    holder: dict[str, str | None]  # object -> actor holding it
    moved_at: dict[str, int] = field(default_factory=dict)  # actor -> line of its last move
    taken_at: dict[str, int] = field(default_factory=dict)  # object -> line its holder took it (get or give)
    dropped: dict[str, Located] = field(default_factory=dict)  # object on the floor -> where, if the story says
    history: dict[str, list[Located]] = field(default_factory=dict)  # object -> known locations, oldest first
    gives: list[tuple[str, str, str, int]] = field(default_factory=list)  # (giver, object, receiver, line)

    @classmethod
    def random(cls, actors: Sequence[str], rng: random.Random) -> World:
        """Actors and objects at random locations, nothing held, nothing told."""
        location = {name: rng.choice(LOCATIONS) for name in (*actors, *OBJECTS)}
        return cls(actors=tuple(actors), location=location, holder={o: None for o in OBJECTS})

    def where(self, name: str) -> str:
        """True location of an actor or object."""
        holder = self.holder.get(name)
        return self.location[holder if holder is not None else name]

    # --- actions: each checks validity, updates the truth and what the story has told ---

    def move(self, actor: str, destination: str, line: int) -> None:
        if destination == self.location[actor] or destination not in LOCATIONS:
            raise ValueError(f"{actor} cannot move from {self.location[actor]} to {destination}")
        self.location[actor] = destination
        self.moved_at[actor] = line
        for obj, holder in self.holder.items():
            if holder == actor:
                self.history.setdefault(obj, []).append(Located(destination, frozenset({self.taken_at[obj], line})))

    def get(self, actor: str, obj: str, line: int) -> None:
        if self.holder[obj] is not None or self.location[obj] != self.location[actor]:
            raise ValueError(f"{actor} cannot get the {obj}")
        self.holder[obj] = actor
        self.taken_at[obj] = line
        self.dropped.pop(obj, None)
        if actor in self.moved_at and not self.history.get(obj):
            here = self.location[actor]
            self.history[obj] = [Located(here, frozenset({self.moved_at[actor], line}))]

    def drop(self, actor: str, obj: str, line: int) -> None:
        if self.holder[obj] != actor:
            raise ValueError(f"{actor} does not hold the {obj}")
        self.holder[obj] = None
        self.location[obj] = self.location[actor]
        if actor in self.moved_at:
            self.dropped[obj] = Located(self.location[actor], frozenset({self.moved_at[actor], line}))

    def give(self, giver: str, obj: str, receiver: str, line: int) -> None:
        if self.holder[obj] != giver or giver == receiver or self.location[giver] != self.location[receiver]:
            raise ValueError(f"{giver} cannot give the {obj} to {receiver}")
        self.holder[obj] = receiver
        self.taken_at[obj] = line
        self.gives.append((giver, obj, receiver, line))

    # --- valid actions ---

    def valid_moves(self) -> list[tuple[str, str]]:
        return [(a, loc) for a in self.actors for loc in LOCATIONS if loc != self.location[a]]

    def valid_gets_drops(self) -> list[tuple[str, str, str]]:
        """``("get" | "drop", actor, object)``."""
        options = []
        for obj, holder in self.holder.items():
            if holder is not None:
                options.append(("drop", holder, obj))
            else:
                options += [("get", a, obj) for a in self.actors if self.location[a] == self.location[obj]]
        return options

    def valid_gives(self) -> list[tuple[str, str, str]]:
        """``(giver, object, receiver)``."""
        return [
            (giver, obj, receiver)
            for obj, giver in self.holder.items()
            if giver is not None
            for receiver in self.actors
            if receiver != giver and self.location[receiver] == self.location[giver]
        ]

    # --- questions: None when the story does not determine the answer ---

    def actor_location(self, actor: str) -> Located | None:
        """qa1 ``Where is X?``: the actor's last move."""
        if actor not in self.moved_at:
            return None
        return Located(self.location[actor], frozenset({self.moved_at[actor]}))

    def object_location(self, obj: str) -> Located | None:
        """qa2 ``Where is the O?`` from two facts: the holder's last move and its taking of the object, or,
        for an object on the floor, the dropper's last move and the drop."""
        holder = self.holder[obj]
        if holder is None:
            return self.dropped.get(obj)
        if holder not in self.moved_at:
            return None
        return Located(self.location[holder], frozenset({self.moved_at[holder], self.taken_at[obj]}))

    def previous_location(self, obj: str) -> tuple[str, Located] | None:
        """qa3 ``Where was the O before the L?``: ``(L, fix of the location before L)``.

        Only when it is unambiguous: every known visit of ``L`` (its current location) follows a visit of the
        same location. Support: the facts fixing the last two locations.
        """
        history = self.history.get(obj, [])
        if len(history) < 2:
            return None
        current = history[-1].location
        visits = [i for i, fix in enumerate(history) if fix.location == current]
        if visits[0] == 0 or len({history[i - 1].location for i in visits}) > 1:
            return None
        before = history[-2]
        return current, Located(before.location, before.support | history[-1].support)


@dataclass(frozen=True)
class StoryLine:
    """A statement, or a question with its answer and the 1-based numbers of its supporting lines."""

    text: str
    answer: str | None = None
    support: tuple[int, ...] = ()

    @property
    def is_question(self) -> bool:
        return self.answer is not None


@dataclass(frozen=True)
class Story:
    task: str
    lines: tuple[StoryLine, ...]

    def samples(self) -> list[BabiSample]:
        """One sample per question: all statements before it, as BABILong's ``TaskDataset`` splits stories."""
        out = []
        for i, line in enumerate(self.lines):
            if line.is_question:
                if not line.support or not all(1 <= n <= i and not self.lines[n - 1].is_question for n in line.support):
                    raise ValueError(f"question {i + 1} ({line.text!r}) must be supported by earlier statements, "
                                     f"got lines {line.support}")
                facts = tuple(s.text for s in self.lines[:i] if not s.is_question)
                refs = tuple(self.lines[n - 1].text for n in line.support)
                out.append(BabiSample(self.task, facts, line.text, line.answer, refs))
        return out


@dataclass(frozen=True)
class BabiSample:
    """A single-question bAbI sample: ``facts`` in story order, ``references`` are the supporting facts."""

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    references: tuple[str, ...]


class _Writer:
    """Appends story lines, rendering actions with the released data's surface forms."""

    def __init__(self, world: World, rng: random.Random):
        self.world, self.rng, self.lines = world, rng, []

    @property
    def next_line(self) -> int:
        return len(self.lines) + 1

    def move(self, actor: str, destination: str) -> None:
        self.world.move(actor, destination, self.next_line)
        self.lines.append(StoryLine(f"{actor} {self.rng.choice(MOVE_VERBS)} to the {destination}."))

    def get_or_drop(self, kind: str, actor: str, obj: str) -> None:
        if kind == "get":
            self.world.get(actor, obj, self.next_line)
            self.lines.append(StoryLine(f"{actor} {self.rng.choice(GET_VERBS)} the {obj} there."))
        else:
            self.world.drop(actor, obj, self.next_line)
            there = " there" if self.rng.random() < 0.5 else ""
            self.lines.append(StoryLine(f"{actor} {self.rng.choice(DROP_VERBS)} the {obj}{there}."))

    def give(self, giver: str, obj: str, receiver: str) -> None:
        self.world.give(giver, obj, receiver, self.next_line)
        self.lines.append(StoryLine(f"{giver} {self.rng.choice(GIVE_VERBS)} the {obj} to {receiver}."))

    def ask(self, question: str, answer: str, support: frozenset[int] | Sequence[int]) -> None:
        self.lines.append(StoryLine(question, answer, tuple(sorted(support))))

    def random_action(self, kinds: Sequence[str]) -> None:
        """One valid action of a kind drawn uniformly from ``kinds`` (redrawn while none is valid)."""
        actions = {
            "move": (self.world.valid_moves, self.move),
            "get_drop": (self.world.valid_gets_drops, self.get_or_drop),
            "give": (self.world.valid_gives, self.give),
        }
        while True:
            valid, act = actions[self.rng.choice(kinds)]
            options = valid()
            if options:
                act(*self.rng.choice(options))
                return


def _qa1(rng: random.Random) -> list[StoryLine]:
    """Single supporting fact: 15 lines, every third a question ``Where is X?`` about a moved actor."""
    w = _Writer(World.random(ACTORS, rng), rng)
    for i in range(1, 16):
        if i % 3:
            w.move(*rng.choice(w.world.valid_moves()))
        else:
            actor = rng.choice(sorted(w.world.moved_at))
            fix = w.world.actor_location(actor)
            w.ask(f"Where is {actor}?", fix.location, fix.support)
    return w.lines


def _qa2_qa3(rng: random.Random, task: str) -> list[StoryLine]:
    """Two / three supporting facts: moves, gets and drops; after more than two statements since the last
    question, with probability 1/2, a question about an object the story locates."""
    w = _Writer(World.random(ACTORS, rng), rng)
    asked, since = 0, 0
    while asked < QUESTIONS_PER_STORY:
        w.random_action(("get_drop", "get_drop", "move"))  # bAbI draws from {get, drop, teleport}
        since += 1
        if since <= 2 or rng.random() >= 0.5:
            continue
        if task == "qa2":
            known = [(o, fix) for o in OBJECTS if (fix := w.world.object_location(o)) is not None]
            if known:
                obj, fix = rng.choice(known)
                w.ask(f"Where is the {obj}?", fix.location, fix.support)
        else:
            known = [(o, found) for o in OBJECTS if (found := w.world.previous_location(o)) is not None]
            if known:
                obj, (current, fix) = rng.choice(known)
                w.ask(f"Where was the {obj} before the {current}?", fix.location, fix.support)
        if known:
            asked, since = asked + 1, 0
    return w.lines


def _qa4(rng: random.Random) -> list[StoryLine]:
    """Two-argument relations: three locations in a row along one axis, two facts relating neighbours (each
    stated from either side, in random order), one question about the middle location's relation to an end."""
    a, b, c = rng.sample(LOCATIONS, 3)
    forward = rng.choice(("north", "east"))  # a is `forward` of b, b is `forward` of c

    def fact(x: str, y: str) -> str:  # x is `forward` of y, said either way round
        if rng.random() < 0.5:
            return f"The {x} is {forward} of the {y}."
        return f"The {y} is {DIRECTIONS[forward]} of the {x}."

    facts = [(fact(a, b), a), (fact(b, c), c)]  # each with the end location it links to the middle b
    rng.shuffle(facts)
    line, end = rng.choice([(1, facts[0][1]), (2, facts[1][1])])
    end_is_of_b = forward if end == a else DIRECTIONS[forward]  # direction of the asked end relative to b
    if rng.random() < 0.5:
        question = f"What is {end_is_of_b} of the {b}?"
    else:
        question = f"What is the {b} {DIRECTIONS[end_is_of_b]} of?"
    return [StoryLine(facts[0][0]), StoryLine(facts[1][0]), StoryLine(question, end, (line,))]


def _qa5(rng: random.Random) -> list[StoryLine]:
    """Three-argument relations: moves, gets, drops and gives; once a give follows more than two statements
    since the last question, 0-5 statements without gives, then a question about that give."""
    w = _Writer(World.random(QA5_ACTORS, rng), rng)
    asked, since = 0, 0
    while asked < QUESTIONS_PER_STORY:
        w.random_action(("move", "get_drop", "give"))
        since += 1
        if since <= 2 or not w.world.gives or w.world.gives[-1][3] != len(w.lines):
            continue
        giver, obj, receiver, line = w.world.gives[-1]
        for _ in range(rng.randint(0, 5)):
            w.random_action(("move", "get_drop"))
        question, answer = rng.choice([
            (f"Who gave the {obj} to {receiver}?", giver),
            (f"Who gave the {obj}?", giver),
            (f"Who received the {obj}?", receiver),
            (f"What did {giver} give to {receiver}?", obj),
            (f"Who did {giver} give the {obj} to?", receiver),
        ])
        w.ask(question, answer, (line,))
        asked, since = asked + 1, 0
    return w.lines


def generate_story(task: str, rng: random.Random) -> Story:
    """One story of ``task`` (``qa1``..``qa5``): 5 questions (qa4: 1), each answered from earlier lines."""
    if task == "qa1":
        lines = _qa1(rng)
    elif task in ("qa2", "qa3"):
        lines = _qa2_qa3(rng, task)
    elif task == "qa4":
        lines = _qa4(rng)
    elif task == "qa5":
        lines = _qa5(rng)
    else:
        raise ValueError(f"unknown bAbI task {task!r}; choose from {TASKS}")
    return Story(task, tuple(lines))


def babi_sample(task: str, seed: int, index: int, max_facts: int | None = None) -> BabiSample:
    """Sample ``index`` of ``seed``: one question, drawn uniformly, of a fresh story.

    With ``max_facts``, stories are drawn until the question has at most that many facts (BABILong drops longer
    samples), so a sample that fits is the same whatever the limit. Depends only on ``(task, seed, index)`` and
    whether the limit is reached.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if max_facts is not None and max_facts < 2:
        raise ValueError(f"max_facts must be >= 2 (every task needs two facts), got {max_facts}")
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint64)
    rng = random.Random(int(state[0]) << 64 | int(state[1]))
    while True:
        sample = rng.choice(generate_story(task, rng).samples())
        if max_facts is None or len(sample.facts) <= max_facts:
            return sample


def format_story(story: Story) -> str:
    """The released bAbI file format, one numbered line per statement or question."""
    out = []
    for n, line in enumerate(story.lines, start=1):
        if line.is_question:
            out.append(f"{n} {line.text} \t{line.answer}\t{' '.join(map(str, line.support))}")
        else:
            out.append(f"{n} {line.text}")
    return "\n".join(out) + "\n"


_LINE = re.compile(r"(\d+) ([^\t]*?)\s*(?:\t([^\t]*)\t([\d ]*))?")


def parse_babi(text: str, task: str) -> list[BabiSample]:
    """Single-question samples from bAbI file text (numbering restarting at 1 starts a story)."""
    stories: list[list[StoryLine]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        m = _LINE.fullmatch(raw.rstrip("\n"))
        if m is None:
            raise ValueError(f"line {number} is not in bAbI format: {raw!r}")
        n, sentence, answer, support = int(m[1]), m[2], m[3], m[4]
        if n == 1:
            stories.append([])
        elif not stories or n != len(stories[-1]) + 1:
            expected = len(stories[-1]) + 1 if stories else 1
            raise ValueError(f"line {number}: expected statement number {expected}, got {n}")
        stories[-1].append(StoryLine(sentence, answer, tuple(int(s) for s in (support or "").split())))
    return [sample for lines in stories for sample in Story(task, tuple(lines)).samples()]
