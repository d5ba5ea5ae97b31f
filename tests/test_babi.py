"""bAbI qa1-qa5: hand-checked stories through the world model, and every generated answer re-derived by an
independent solver that reads only the story text (once from all facts, once from the supporting facts)."""

import random
import re

import pytest

from titans.data.babi import (
    ACTORS,
    LOCATIONS,
    OBJECTS,
    QA5_ACTORS,
    TASKS,
    Story,
    StoryLine,
    World,
    babi_sample,
    format_story,
    generate_story,
    parse_babi,
)

MOVE = re.compile(r"(\w+) (?:moved|went|journeyed|travelled|went back) to the (\w+)\.")
GET = re.compile(r"(\w+) (?:got|grabbed|picked up|took) the (\w+) there\.")
DROP = re.compile(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)(?: there)?\.")
GIVE = re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.")
RELATION = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def solve(facts, question):
    """Answer a qa1-qa5 question from statements alone (an independent re-derivation)."""
    actor_at, holder, object_at, history, gives, relations = {}, {}, {}, {}, [], set()

    def locate(obj, place):
        object_at[obj] = place
        if not history.get(obj) or history[obj][-1] != place:
            history.setdefault(obj, []).append(place)

    for fact in facts:
        if m := MOVE.fullmatch(fact):
            actor_at[m[1]] = m[2]
            for obj in [o for o, h in holder.items() if h == m[1]]:
                locate(obj, m[2])
        elif m := GET.fullmatch(fact):
            holder[m[2]] = m[1]
            if m[1] in actor_at:
                locate(m[2], actor_at[m[1]])
        elif m := DROP.fullmatch(fact):
            holder.pop(m[2], None)
            if m[1] in actor_at:  # dropped "there": where the actor is
                locate(m[2], actor_at[m[1]])
        elif m := GIVE.fullmatch(fact):
            holder[m[2]] = m[3]
            gives.append((m[1], m[2], m[3]))
        elif m := RELATION.fullmatch(fact):
            relations |= {(m[1], m[2], m[3]), (m[3], OPPOSITE[m[2]], m[1])}
        else:
            raise AssertionError(f"not a released bAbI statement form: {fact!r}")

    def latest_give(giver=None, obj=None, receiver=None):
        matching = [g for g in gives if giver in (None, g[0]) and obj in (None, g[1]) and receiver in (None, g[2])]
        return matching[-1]

    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return actor_at[m[1]]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return object_at[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        visits = history[m[1]]
        before = {visits[i - 1] for i, place in enumerate(visits) if place == m[2]}
        assert visits[-1] == m[2] and visits[0] != m[2] and len(before) == 1, (visits, m[2])
        return before.pop()
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        (answer,) = [x for x, d, y in relations if d == m[1] and y == m[2]]
        return answer
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        (answer,) = [y for x, d, y in relations if x == m[1] and d == m[2]]
        return answer
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        return latest_give(obj=m[1], receiver=m[2])[0]
    if m := re.fullmatch(r"Who gave the (\w+)\?", question):
        return latest_give(obj=m[1])[0]
    if m := re.fullmatch(r"Who received the (\w+)\?", question):
        return latest_give(obj=m[1])[2]
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        return latest_give(giver=m[1], receiver=m[2])[1]
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        return latest_give(giver=m[1], obj=m[2])[2]
    raise AssertionError(f"not a qa1-qa5 question: {question!r}")


def world(actors=ACTORS, **places):
    """A world with everybody/everything at the given (or the first) location, nothing held."""
    location = {name: places.get(name, "bathroom") for name in (*actors, *OBJECTS)}
    return World(actors=tuple(actors), location=location, holder={o: None for o in OBJECTS})


def test_hand_story_qa1_where_is_actor():
    w = world()
    w.move("Mary", "kitchen", 1)
    w.move("John", "office", 2)
    w.move("Mary", "garden", 3)
    assert (w.actor_location("Mary").location, w.actor_location("Mary").support) == ("garden", {3})
    assert w.actor_location("John").location == "office"
    assert w.actor_location("Sandra") is None  # never mentioned: the story does not say
    with pytest.raises(ValueError, match="cannot move"):
        w.move("Mary", "garden", 4)


def test_hand_story_qa2_where_is_object():
    w = world(apple="kitchen", milk="kitchen", football="hallway", Mary="kitchen")
    w.move("John", "kitchen", 1)
    w.get("John", "apple", 2)
    assert w.object_location("apple").location == "kitchen" and w.object_location("apple").support == {1, 2}
    w.move("John", "office", 3)
    assert (w.object_location("apple").location, w.object_location("apple").support) == ("office", {2, 3})
    w.drop("John", "apple", 4)
    w.move("John", "garden", 5)
    assert (w.object_location("apple").location, w.object_location("apple").support) == ("office", {3, 4})
    w.get("Mary", "milk", 6)  # Mary never moved: where she (and the milk) is, the story does not say
    assert w.object_location("milk") is None and w.object_location("football") is None
    with pytest.raises(ValueError, match="cannot get"):
        w.get("Daniel", "football", 7)  # Daniel is in the bathroom, the football in the hallway
    with pytest.raises(ValueError, match="does not hold"):
        w.drop("Daniel", "milk", 7)


def test_hand_story_qa3_where_was_object_before():
    # the bAbI paper's example: John picked up the apple. John went to the office. John went to the kitchen.
    # John dropped the apple. Where was the apple before the kitchen? office
    w = world(apple="bathroom")
    w.get("John", "apple", 1)
    w.move("John", "office", 2)
    w.move("John", "kitchen", 3)
    w.drop("John", "apple", 4)
    current, before = w.previous_location("apple")
    assert (current, before.location, before.support) == ("kitchen", "office", {1, 2, 3})
    # ... then back to the office: its two visits follow different places (bathroom? unknown; kitchen), ambiguous
    w.get("John", "apple", 5)
    w.move("John", "office", 6)
    assert w.previous_location("apple") is None
    w.move("John", "garden", 7)
    w.move("John", "office", 8)  # office after kitchen, after garden: still ambiguous
    assert w.previous_location("apple") is None


def test_hand_story_qa3_repeated_visit_with_one_predecessor():
    w = world(milk="bathroom")
    w.move("Mary", "garden", 1)
    w.move("Mary", "bathroom", 2)
    w.get("Mary", "milk", 3)  # milk known in the bathroom
    for line, place in enumerate(["kitchen", "bathroom", "kitchen"], start=4):
        w.move("Mary", place, line)
    current, before = w.previous_location("milk")  # kitchen always followed the bathroom
    assert (current, before.location, before.support) == ("kitchen", "bathroom", {3, 5, 6})


def test_hand_story_qa5_gives():
    w = world(QA5_ACTORS, football="hallway", Fred="hallway", Jeff="hallway")
    w.get("Fred", "football", 1)
    w.give("Fred", "football", "Jeff", 2)
    w.give("Jeff", "football", "Fred", 3)
    assert w.holder["football"] == "Fred"
    assert w.gives == [("Fred", "football", "Jeff", 2), ("Jeff", "football", "Fred", 3)]
    with pytest.raises(ValueError, match="cannot give"):
        w.give("Fred", "football", "Bill", 4)  # Bill is in the bathroom


def test_released_qa5_story_parses_and_solves():
    """The first story of the released qa5_three-arg-relations_train.txt (bAbI v1.2)."""
    text = (
        "1 Fred picked up the football there.\n2 Fred gave the football to Jeff.\n"
        "3 What did Fred give to Jeff? \tfootball\t2\n4 Bill went back to the bathroom.\n"
        "5 Jeff grabbed the milk there.\n6 Who gave the football to Jeff? \tFred\t2\n"
        "7 Jeff gave the football to Fred.\n8 Fred handed the football to Jeff.\n"
        "9 What did Fred give to Jeff? \tfootball\t8\n10 Jeff handed the football to Fred.\n"
        "11 Fred gave the football to Jeff.\n12 Who did Fred give the football to? \tJeff\t11\n"
        "13 Jeff gave the football to Fred.\n14 Jeff put down the milk.\n"
        "15 Who did Jeff give the football to? \tFred\t13\n"
        "1 Mary moved to the hallway.\n2 Where is Mary? \thallway\t1\n"
    )
    samples = parse_babi(text, "qa5")
    assert len(samples) == 6
    assert samples[1].facts == ("Fred picked up the football there.", "Fred gave the football to Jeff.",
                                "Bill went back to the bathroom.", "Jeff grabbed the milk there.")
    assert (samples[1].question, samples[1].answer, samples[1].references) == (
        "Who gave the football to Jeff?", "Fred", ("Fred gave the football to Jeff.",))
    assert samples[5].facts == ("Mary moved to the hallway.",)
    assert all(solve(s.facts, s.question) == s.answer for s in samples)
    with pytest.raises(ValueError, match="expected statement number"):
        parse_babi("1 Mary moved to the hallway.\n3 Where is Mary? \thallway\t1\n", "qa1")


@pytest.mark.parametrize("task", TASKS)
def test_generated_answers_are_rederived_from_the_text(task):
    for seed in range(40):
        story = generate_story(task, random.Random(seed))
        samples = story.samples()
        assert len(samples) == (1 if task == "qa4" else 5)
        for sample in samples:
            assert solve(sample.facts, sample.question) == sample.answer, (seed, format_story(story))
            # the supporting facts alone are enough
            assert solve(sample.references, sample.question) == sample.answer, (seed, format_story(story))


@pytest.mark.parametrize("task", TASKS)
def test_story_shape_and_vocabulary(task):
    story = generate_story(task, random.Random(0))
    actors = QA5_ACTORS if task == "qa5" else ACTORS
    for line in story.lines:
        if not line.is_question:
            names = re.findall(r"\b[A-Z][a-z]+\b", line.text.replace("The ", ""))
            assert set(names) <= set(actors)
    words = set(re.findall(r"[a-z]+", " ".join(line.text for line in story.lines)))
    assert words & set(LOCATIONS)
    if task == "qa1":
        assert [i + 1 for i, line in enumerate(story.lines) if line.is_question] == [3, 6, 9, 12, 15]
    if task == "qa4":
        assert len(story.lines) == 3 and story.lines[2].support in ((1,), (2,))


@pytest.mark.parametrize("task", TASKS)
def test_file_format_round_trip(task):
    story = generate_story(task, random.Random(3))
    text = format_story(story)
    question = next(line for line in text.splitlines() if "?" in line)
    assert re.fullmatch(r"\d+ [^\t]+\? \t\w+\t\d+( \d+)*", question)  # the released layout
    assert parse_babi(text, task) == story.samples()


def test_samples_are_deterministic_and_respect_max_facts():
    assert babi_sample("qa2", 1, 4) == babi_sample("qa2", 1, 4)
    assert len({babi_sample("qa2", 1, i).question + babi_sample("qa2", 1, i).facts[0] for i in range(10)}) > 5
    short = [babi_sample("qa3", 0, i, max_facts=12) for i in range(10)]
    assert all(len(s.facts) <= 12 for s in short)
    unlimited = babi_sample("qa3", 0, 0)
    if len(unlimited.facts) <= 12:
        assert short[0] == unlimited


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown bAbI task"):
        generate_story("qa6", random.Random(0))
    with pytest.raises(ValueError, match="max_facts"):
        babi_sample("qa1", 0, 0, max_facts=1)
    with pytest.raises(ValueError, match="supported by earlier statements"):
        Story("qa1", (StoryLine("Where is Mary?", "hallway", (1,)),)).samples()
    with pytest.raises(ValueError, match="not in bAbI format"):
        parse_babi("Mary moved to the hallway.", "qa1")
