"""Seeded generator of multi-session persona conversations with questions in every memory category.

The offline default of the dialogue family. One conversation is a chat between a user and a friend over
``sessions`` dated sessions of ``turns`` utterances each (user and friend alternate, the user first). Facts about
the user are planted in single utterances, the rest is small talk, and questions probe them afterwards:

* **single-hop**: one planted fact ("My dog is called Biscuit." -> "What is the name of Ana's dog?" -> Biscuit);
* **multi-hop**: two facts in different sessions that must be joined ("My sister is called Maria." and later
  "Maria lives in Lisbon now." -> "In which city does Ana's sister live?" -> Lisbon);
* **temporal**: two events of the same kind on different dates ("I went to a concert by Coldplay today.");
  the question names the month and year of one of them, answerable only from the session dates;
* **knowledge-update**: an attribute that changes over time (city, job); the latest value wins and an older
  stale value sits in an earlier session;
* **adversarial**: an attribute of the user that was never stated, while the friend states the same attribute
  about themselves (a distractor); the right answer is to abstain ("not mentioned").

Each conversation asks 7 questions: 2 single-hop, 1 multi-hop, 1 temporal, 2 knowledge-update (city and job)
and 1 adversarial, interleaved by category; which facts are used is drawn per conversation. Friend utterances
carry distractor facts of the same kinds (the friend's own dog, city, cat, car), and the remaining slots are
small talk. Answers are short (names, cities, numbers, jobs) so that a
small chat model can answer when the right turn is in its context. Everything is drawn from
``random.Random(f"{seed}:{index}")``, so a conversation depends only on the seed, its index and the sizes.

Answer candidates (the QA family's ``choice_acc``): every answerable question lists up to ``N_CANDIDATES``
values of its attribute, sorted: the gold answer, the other values of that attribute stated in the conversation
(stale cities and jobs, the friend's city, pet and cat names, the other concert or sport, the relative's city
or job), then values of the attribute's list (``CITIES``, ``JOBS``, ``PET_NAMES``, ``FOODS``, ``BANDS``,
``SPORTS``, 2-5 children) drawn from a separate ``random.Random(f"{seed}:{index}:candidates")``, so adding
them changed nothing else. Adversarial questions have none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from r3mem_bench.errors import UserError

USER_NAMES = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Liam",
              "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sami", "Tara", "Victor"]
FRIEND_NAMES = ["Sam", "Alex", "Jordan", "Robin", "Casey", "Morgan", "Jamie", "Riley"]
PET_NAMES = ["Biscuit", "Pepper", "Luna", "Milo", "Rocky", "Daisy", "Oscar", "Ziggy", "Maple", "Nacho", "Olive",
             "Toby"]
SISTERS = ["Maria", "Sofia", "Nina", "Hana", "Clara", "Greta", "Leila", "Marta"]
BROTHERS = ["Tomas", "Lucas", "Marco", "Felix", "Omar", "Ivan", "Diego", "Anton"]
CITIES = ["Lisbon", "Denver", "Boston", "Madrid", "Oslo", "Dublin", "Seattle", "Prague", "Vienna", "Austin",
          "Toronto", "Munich", "Chicago", "Sydney"]
JOBS = ["nurse", "teacher", "chef", "pilot", "architect", "dentist", "lawyer", "plumber", "librarian",
        "photographer", "baker", "engineer"]
BANDS = ["Coldplay", "Metallica", "Radiohead", "Adele", "Queen", "Muse", "Shakira", "Abba", "Oasis", "Blondie"]
SPORTS = ["tennis", "swimming", "climbing", "boxing", "rowing", "fencing", "karate", "surfing", "cycling", "golf"]
FOODS = ["pizza", "sushi", "tacos", "pasta", "curry", "ramen", "paella", "dumplings"]
SMALL_TALK = [
    "How has your week been?", "Pretty busy, but good overall.", "The weather has been lovely lately.",
    "I watched a funny movie last night.", "I am trying to drink more water these days.",
    "Work was quiet today, thankfully.", "I finally cleaned my kitchen.", "Do you have plans for the weekend?",
    "Not really, maybe just relaxing at home.", "I read a good book on the train.", "That sounds nice!",
    "I have been sleeping better recently.", "My neighbour was playing loud music again.",
    "I tried a new coffee place this morning.", "Traffic was terrible on the way home.", "Haha, same here.",
    "I should really call my parents more often.", "I bought a new plant for the balcony.",
    "It has been raining all day here.", "I am thinking about learning to cook better.", "Good to hear from you!",
    "I went for a long walk in the park.", "My phone battery keeps dying.", "That is interesting, tell me more.",
]
N_CANDIDATES = 5
KIDS = ["2", "3", "4", "5"]
ATTRIBUTE_POOLS = {"city": CITIES, "job": JOBS, "pet": PET_NAMES, "food": FOODS, "kids": KIDS, "concert": BANDS,
                   "sport": SPORTS}
CATEGORIES = ("single-hop", "multi-hop", "temporal", "knowledge-update", "adversarial")
ABSTAIN_ANSWER = "not mentioned"


@dataclass
class Turn:
    """One utterance: ``dia_id`` is ``D<session>:<turn>`` (1-based) as in LoCoMo."""

    dia_id: str
    speaker: str
    text: str


@dataclass
class Session:
    """A dated session of turns."""

    date: datetime
    turns: list[Turn] = field(default_factory=list)


@dataclass
class Question:
    """A question with its short gold answer, category and evidence turn ids (the last one holds the answer)."""

    question: str
    answer: str
    category: str
    evidence: list[str]
    answerable: bool = True
    stale: list[str] = field(default_factory=list)  # knowledge-update: older values and where they were stated
    stale_evidence: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)  # gold + same-attribute distractors, sorted (choice_acc)


@dataclass
class Conversation:
    """A generated multi-session conversation and its questions."""

    id: str
    user: str
    friend: str
    sessions: list[Session]
    questions: list[Question]

    def turn(self, dia_id: str) -> Turn:
        """The turn with id ``dia_id``."""
        s, t = dia_id[1:].split(":")
        return self.sessions[int(s) - 1].turns[int(t) - 1]


@dataclass
class _Plant:
    """A planned utterance: who says what, in which session (filled into a free slot of that session)."""

    speaker: str  # "user" | "friend"
    text: str
    session: int
    key: str = ""  # name under which the planted turn's dia_id is recorded


def _a(word: str) -> str:
    """The word with its indefinite article ('a nurse', 'an engineer')."""
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _month(d: datetime) -> str:
    return d.strftime("%B %Y")


def human_date(d: datetime) -> str:
    """LoCoMo-style session date: '1:56 pm on 8 May, 2023'."""
    return f"{d.strftime('%I:%M').lstrip('0')} {d.strftime('%p').lower()} on {d.day} {d.strftime('%B, %Y')}"


def generate_conversation(seed: int, index: int, sessions: int = 4, turns: int = 8) -> Conversation:
    """One conversation, a function of (seed, index, sessions, turns) only."""
    if sessions < 3:
        raise UserError(f"persona generator: sessions={sessions} is too few; fix: use at least 3 sessions "
                        "(knowledge updates and multi-hop facts need several)")
    if turns < 4 or turns % 2:
        raise UserError(f"persona generator: turns={turns} must be an even number >= 4; fix: e.g. turns=8")
    rng = random.Random(f"{seed}:{index}")
    user, friend = rng.choice(USER_NAMES), rng.choice(FRIEND_NAMES)
    start = datetime(2023, 1, 1, tzinfo=timezone.utc) + timedelta(days=rng.randrange(0, 60))
    dates, day = [], start
    for _ in range(sessions):  # gaps of 33+ days: every session falls in its own month
        day = day + timedelta(days=rng.randrange(33, 50))
        dates.append(day + timedelta(minutes=rng.randrange(9 * 60, 21 * 60)))
    plants: list[_Plant] = []
    questions: list[tuple[str, str, str, list[str], dict]] = []  # (category, question, answer, evidence keys, extra)

    half = turns // 2
    used: dict[tuple[str, int], int] = {}
    stated: dict[str, list[str]] = {k: [] for k in ATTRIBUTE_POOLS}  # values said in the conversation, per attribute

    def pick(pool: list[str], k: int) -> list[str]:
        return rng.sample(pool, k)

    def place(speaker: str, n: int = 1) -> list[int]:
        """``n`` different sessions, in time order, where ``speaker`` still has a free slot."""
        free = [s for s in range(sessions) if used.get((speaker, s), 0) < half]
        if len(free) < n:
            raise UserError(f"persona generator: sessions={sessions} x turns={turns} leaves too few slots for the "
                            "planted facts; fix: use more turns or sessions (e.g. the default 4 x 8)")
        chosen = sorted(rng.sample(free, n))
        for s in chosen:
            used[(speaker, s)] = used.get((speaker, s), 0) + 1
        return chosen

    cities = pick(CITIES, 5)  # sister's, friend's, and up to three of the user's: all different
    jobs = pick(JOBS, 4)  # brother's and up to three of the user's

    # knowledge-update: city and job change over time; the latest value wins
    for kind, pool, first, update, qtext in (
        ("city", cities[2:], "I live in {x}.", "I just moved to {x}, so I live in {x} now.",
         "Which city does {u} live in now?"),
        ("job", jobs[1:], "I work as {a}.", "I changed jobs, I work as {a} now.", "What is {u}'s job now?"),
    ):
        n_values = 3 if sessions >= 5 and rng.random() < 0.5 else 2
        values = pick(pool, n_values)
        where = place("user", n_values)
        keys = [f"{kind}_{i}" for i in range(n_values)]
        plants.append(_Plant("user", first.format(x=values[0], a=_a(values[0])), where[0], keys[0]))
        for i in range(1, n_values):
            plants.append(_Plant("user", update.format(x=values[i], a=_a(values[i])), where[i], keys[i]))
        questions.append(("knowledge-update", qtext.format(u=user), values[-1], [keys[-1]],
                          {"stale": values[:-1], "stale_keys": keys[:-1], "attr": kind}))
        stated[kind] += values

    # multi-hop: a relative's name, then (in a later session) where that person lives or what they do
    sister, brother = rng.choice(SISTERS), rng.choice(BROTHERS)
    s1, s2 = place("user", 2)
    if rng.random() < 0.5:
        plants.append(_Plant("user", f"My sister is called {sister}.", s1, "rel"))
        plants.append(_Plant("user", f"{sister} lives in {cities[0]} now.", s2, "rel_fact"))
        questions.append(("multi-hop", f"In which city does {user}'s sister live?", cities[0], ["rel", "rel_fact"],
                          {"attr": "city"}))
        stated["city"].append(cities[0])
    else:
        plants.append(_Plant("user", f"My brother is called {brother}.", s1, "rel"))
        plants.append(_Plant("user", f"{brother} works as {_a(jobs[0])}.", s2, "rel_fact"))
        questions.append(("multi-hop", f"What is the job of {user}'s brother?", jobs[0], ["rel", "rel_fact"],
                          {"attr": "job"}))
        stated["job"].append(jobs[0])

    # temporal: two events of a kind in different sessions (so different months); ask about one by its month
    for kind, pool, template, qtemplate in rng.sample([
        ("concert", BANDS, "I went to a concert by {x} today.", "Which band did {u} see in concert in {m}?"),
        ("sport", SPORTS, "I tried {x} for the first time today.", "Which sport did {u} try for the first time in {m}?"),
    ], 1):
        a, b = pick(pool, 2)
        sa, sb = place("user", 2)
        if rng.random() < 0.5:
            sa, sb = sb, sa
        plants.append(_Plant("user", template.format(x=a), sa, f"{kind}_a"))
        plants.append(_Plant("user", template.format(x=b), sb, f"{kind}_b"))
        questions.append(("temporal", qtemplate.format(u=user, m=_month(dates[sa])), a, [f"{kind}_a"],
                          {"attr": kind}))
        stated[kind] += [a, b]

    # single-hop: two of pet name, favourite food, number of children
    pet, friend_pet, cat = pick(PET_NAMES, 3)
    food, kids = rng.choice(FOODS), str(rng.randint(2, 5))
    single = [("pet", f"My dog is called {pet}.", f"What is the name of {user}'s dog?", pet),
              ("food", f"My favourite food is {food}.", f"What is {user}'s favourite food?", food),
              ("kids", f"I have {kids} children.", f"How many children does {user} have?", kids)]
    for key, text, qtext, answer in rng.sample(single, 2):
        plants.append(_Plant("user", text, place("user")[0], key))
        questions.append(("single-hop", qtext, answer, [key], {"attr": key}))
        stated[key].append(answer)
    stated["pet"] += [friend_pet, cat]

    # distractors said by the friend about themselves, and adversarial questions about what the user never said
    car = rng.choice(["Toyota", "Volvo", "Honda", "Tesla", "Fiat", "Mazda"])
    plants.append(_Plant("friend", f"My dog is called {friend_pet}, he is so playful.", place("friend")[0]))
    plants.append(_Plant("friend", f"I live in {cities[1]}, it is lovely there.", place("friend")[0]))
    stated["city"].append(cities[1])
    plants.append(_Plant("friend", f"My cat is called {cat}.", place("friend")[0]))
    plants.append(_Plant("friend", f"I drive a {car}.", place("friend")[0]))
    questions.append(rng.choice([("adversarial", f"What is the name of {user}'s cat?", ABSTAIN_ANSWER, [], {}),
                                 ("adversarial", f"Which car brand does {user} drive?", ABSTAIN_ANSWER, [], {})]))

    # lay out: each session has turns/2 exchanges (user, friend); planted utterances take their speaker's slot
    by_session: dict[int, list[_Plant]] = {}
    for p in plants:
        by_session.setdefault(p.session, []).append(p)
    convo_sessions: list[Session] = []
    where_key: dict[str, str] = {}
    for s in range(sessions):
        mine = by_session.get(s, [])
        users = [p for p in mine if p.speaker == "user"]
        friends = [p for p in mine if p.speaker == "friend"]
        uslots = sorted(rng.sample(range(half), len(users)))
        fslots = sorted(rng.sample(range(half), len(friends)))
        rng.shuffle(users)
        rng.shuffle(friends)
        ulines: list[_Plant | str] = [rng.choice(SMALL_TALK) for _ in range(half)]
        flines: list[_Plant | str] = [rng.choice(SMALL_TALK) for _ in range(half)]
        for slot, p in zip(uslots, users):
            ulines[slot] = p
        for slot, p in zip(fslots, friends):
            flines[slot] = p
        session = Session(date=dates[s])
        for i in range(half):
            for speaker, line in ((user, ulines[i]), (friend, flines[i])):
                dia_id = f"D{s + 1}:{len(session.turns) + 1}"
                if isinstance(line, _Plant):
                    if line.key:
                        where_key[line.key] = dia_id
                    line = line.text
                session.turns.append(Turn(dia_id, speaker, line))
        convo_sessions.append(session)

    out_q = []
    crng = random.Random(f"{seed}:{index}:candidates")  # its own stream: the conversation is unchanged
    for category, text, answer, keys, extra in questions:
        out_q.append(Question(
            question=text, answer=answer, category=category, evidence=[where_key[k] for k in keys],
            answerable=category != "adversarial", stale=list(extra.get("stale", [])),
            stale_evidence=[where_key[k] for k in extra.get("stale_keys", [])],
            candidates=_candidates(answer, extra["attr"], stated, crng) if "attr" in extra else []))
    # interleave categories so that the first questions of a conversation cover every category
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rank: dict[str, int] = {}
    keyed = []
    for q in out_q:
        keyed.append((rank.get(q.category, 0), order[q.category], q))
        rank[q.category] = rank.get(q.category, 0) + 1
    out_q = [q for _, _, q in sorted(keyed, key=lambda t: (t[0], t[1]))]
    return Conversation(id=f"persona-s{seed}-{index:03d}", user=user, friend=friend, sessions=convo_sessions,
                        questions=out_q)


def _candidates(gold: str, attr: str, stated: dict[str, list[str]], rng: random.Random) -> list[str]:
    """Gold + values of ``attr`` stated in the conversation + values drawn from its list: ``N_CANDIDATES``, sorted."""
    near = sorted(set(stated[attr]) - {gold})[: N_CANDIDATES - 1]
    rest = [v for v in ATTRIBUTE_POOLS[attr] if v != gold and v not in near]
    fill = rng.sample(rest, min(len(rest), N_CANDIDATES - 1 - len(near)))
    return sorted([gold, *near, *fill])


def generate(seed: int = 0, conversations: int = 8, sessions: int = 4, turns: int = 8) -> list[Conversation]:
    """``conversations`` conversations for ``seed`` (conversation i is the same whatever the count)."""
    if conversations < 1:
        raise UserError(f"persona generator: conversations={conversations}; fix: use at least 1")
    return [generate_conversation(seed, i, sessions, turns) for i in range(conversations)]
