"""Deterministic generator of a keyboard dataset in TFF's Stack Overflow layout (the embedded default).

Each client is one user typing short messages. Text is real English word statistics
(`words`: Google Books Ngram unigram and bigram counts) shaped per user the way typed
text is personal:

* a global bigram Markov chain over the 20,000 most frequent words (Zipfian), read
  with a per-user temperature (some users keep to common continuations, some do not)
  and per-user habits: the first continuation a user picks after a word becomes their
  habitual one, reused with a per-user probability;
* 1-3 of 20 named topics per user with Dirichlet weights; with a per-user rate the next
  word is one of the topic's content words, weighted by the user's own Gamma-drawn
  preferences (two users of one topic favour different words of it);
* 10-30 personal words, rare in the counts (ranks 5,000 and beyond: a street, a pet, a
  hobby), used at a per-user rate of 1-5%: the long tail that falls out of vocabulary;
* recurring phrases: greetings ("hey", "good morning") often with one of the user's
  2-5 contacts' first names, sign-offs ("see you soon", "love you"), stock phrases
  ("on my way", "call me later"), filler words and punctuation habits.

Messages are typed-message long (log-normal words, median 8, at most 40), users are
skewed in how much they type (log-normal messages, median `median_messages`, at least
2). Tokens are lowercase, punctuation (". , ? !") separate, space-joined: TFF's Stack
Overflow `tokens`. Each user's messages are in time order; the last tenth is the
"test" split, the tenth before it "heldout", the rest "train", as TFF's Stack Overflow
holds out later posts.

The output is exactly TFF's Stack Overflow files: `stackoverflow.sqlite` (read by
`tff.simulation.datasets.stackoverflow.load_data`), `stackoverflow.word_count` (word,
tab, number of train users using it, most used first) and `stackoverflow.tag_count`
(JSON {tag: train users with it}). Writing is atomic: temporary files renamed once all three
are complete, the SQLite file last, and it records the generator version and config.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import datetime
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Sequence

import numpy as np

from tffpipe import configs, processes
from tffpipe.data import example_proto, sql_files
from tffpipe.tasks.keyboard import words

GENERATOR_VERSION = 1
FILE_NAME = "stackoverflow.sqlite"
WORD_COUNT_FILE = "stackoverflow.word_count"
TAG_COUNT_FILE = "stackoverflow.tag_count"
SPLITS = ("train", "heldout", "test")
HELDOUT_FRACTION = 0.1  # of each user's messages, before the test ones
TEST_FRACTION = 0.1  # of each user's messages, the latest
MIN_MESSAGES = 2
MEDIAN_WORDS = 8  # words per message (punctuation not counted)
WORDS_SIGMA = 0.6
MAX_WORDS = 40
PUNCTUATION = (".", ",", "?", "!")
_CHUNK = 50  # users per task handed to a worker process
_EPOCH = int(datetime.datetime(2017, 1, 1, tzinfo=datetime.UTC).timestamp())

TextPopulationConfig = configs.TextPopulationConfig


def _words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of a literal (word lists read better as text)."""
    return tuple(text.split())


# Hand-picked content words per topic, of which those in the word counts and outside the
# 100 most frequent words are used. Neighbours in the bigram data are not added: in the
# web-crawled counts they are mostly generic web words and spam.
TOPICS = {
    "food": """dinner lunch breakfast pizza chicken cheese coffee restaurant recipe cake soup salad pasta rice bread
        sandwich burger fries steak beef pork bacon eggs cookies chocolate dessert snack kitchen cook cooking baking
        oven grill grilled delicious tasty hungry menu takeout delivery sauce spicy garlic onion tomato potato
        potatoes vegetables fruit apple banana strawberry lemon juice tea wine beer drinks cafe bakery cupcake pie
        cream butter sugar flour noodles sushi curry salmon shrimp seafood vegan brunch meal meals groceries grocery
        fridge dishes plate bowl spoon chef tasted flavor sweet roast turkey""",
    "sports": """team football basketball soccer player players season coach league baseball hockey match score
        scored goal goals win won lose lost playoffs championship tournament stadium fans referee quarterback
        pitcher inning touchdown overtime defense draft trade injury injured roster jersey tickets bench practice
        training workout gym tennis golf rugby cricket olympics medal race racing runner marathon cycling boxing
        fight wrestling ball bat court field pitch kickoff rivals victory defeat standings fantasy highlights stats
        points rebounds assists penalty""",
    "music": """song songs album band concert guitar singer tour lyrics radio playlist musician drums piano bass
        drummer vocals chorus melody track tracks single record recording studio stage festival tickets gig rock
        jazz pop rap hip hop country classical orchestra violin opera headphones vinyl acoustic remix beat beats
        dance dancing sing singing listen listening fans encore venue lyric tune tunes soundtrack duet choir
        karaoke microphone amp rehearsal""",
    "movies": """movie movies film films actor actress episode episodes series show shows watch watching cinema
        theatre trailer comedy drama horror thriller sequel premiere director scene scenes plot ending season finale
        character characters cast netflix popcorn tickets screen documentary animated cartoon oscar oscars award
        nominated starring hero villain spoiler spoilers channel television streaming rated script role roles""",
    "travel": """flight flights hotel trip airport beach vacation travel passport island cruise luggage suitcase
        packing booked booking reservation resort tour tourist tourists sightseeing visa abroad journey train bus
        taxi ticket tickets hostel motel camping road destination europe paris london italy spain japan mexico
        hawaii florida mountains coast ocean sunset souvenir souvenirs jet lag delayed boarding gate landing
        departure arrival itinerary adventure explore guide museum""",
    "work": """meeting meetings office boss project deadline client clients manager schedule report emails
        presentation conference colleague colleagues shift overtime salary promotion interview job hired resume
        career team agenda budget proposal contract invoice spreadsheet slides call calls zoom desk printer lunch
        break weekend monday friday workload task tasks update updates payroll employer employee employees staff
        training""",
    "school": """class classes exam exams homework teacher teachers students student college grade grades lecture
        test tests quiz essay assignment assignments professor semester campus library study studying notes
        textbook science history biology chemistry physics english course courses degree graduation graduate
        tuition scholarship dorm roommate finals project projects tutor classmates recess principal diploma thesis""",
    "family": """dad kids baby sister brother parents wedding family birthday grandma grandpa aunt uncle cousin
        cousins daughter son husband wife children nephew twins toddler newborn pregnant anniversary reunion
        relatives grandparents mother father siblings bedtime diaper diapers nap daycare christmas thanksgiving
        holidays gifts gift presents party celebrate celebration proud hugs""",
    "health": """doctor hospital medicine pain sleep gym workout diet exercise sick fever flu cold cough headache
        appointment dentist nurse clinic surgery recovery therapy prescription pills vitamins allergies allergy
        injury stretch yoga running weight calories protein healthy tired exhausted rest sore muscles blood pressure
        symptoms virus vaccine insurance pharmacy meditation stress anxiety mental steps fitness""",
    "shopping": """store stores sale shoes dress prices shopping delivery discount mall coupon coupons cart checkout
        returned refund size sizes jeans shirt jacket coat boots bag purse makeup outfit clothes brand brands cheap
        expensive deal deals bargain amazon shipped shipping package receipt cashier browse bought buying paid
        afford budget fitting""",
    "weather": """rain snow weather sunny cold hot storm wind temperature forecast cloudy rainy freezing heat thunder
        lightning umbrella ice icy sunshine breeze degrees fog hail tornado hurricane flood flooding warm warmer
        spring summer autumn winter frost blizzard drought outside sky clouds shade jacket""",
    "tech": """phone computer laptop app apps update screen battery internet wifi charger password tablet keyboard
        mouse printer download install upgrade bug crash reboot restart settings account website browser google
        camera photos texts messages charging bluetooth cable router signal cloud backup storage virus hacked login
        code coding developer programming server""",
    "money": """bank money rent bill bills pay credit loan budget salary tax taxes cash debt savings account mortgage
        insurance payment payments expenses invest investment stocks stock market afford expensive cheap cost costs
        fee fees refund deposit withdraw transfer wallet card atm interest bonus spending spent save saving income""",
    "cars": """car cars drive driving traffic road gas parking engine truck insurance repair mechanic tire tires
        brakes oil license highway freeway speed ticket lane accident crash fuel garage dealer dealership keys
        wheel steering windshield trunk battery commute rush ride taxi bike motorcycle van miles exit""",
    "home": """house kitchen garden room clean cleaning furniture apartment bed door paint painting couch sofa laundry
        dishes vacuum carpet floor walls window windows roof yard lawn plants flowers landlord moving boxes lease
        bathroom shower bedroom closet garage basement repairs plumber leak heater lights lamp curtains pillow
        blanket decorating renovation""",
    "pets": """dog cat puppy vet pet kitten dogs cats puppies breed leash walk walks fetch treats treat bark barking
        collar bowl cage fish bird birds hamster rabbit bunny horse paws fur tail grooming adopt adopted shelter
        rescue litter kitty chew toys toy feeding fed kennel""",
    "games": """play playing played level levels playstation nintendo console controller multiplayer quest boss
        character characters points achievement achievements server lag stream streaming team match ranked rank
        win won lost strategy puzzle chess cards board dice tournament beat beating""",
    "politics": """election vote voting government president law debate party senate congress campaign candidate
        candidates governor mayor court judge supreme protest economy healthcare immigration poll polls republicans
        democrats liberal conservative minister parliament reform bill bills scandal media speech votes ballot""",
    "books": """novel reading author story stories chapter chapters library writing poem poems pages series fiction
        fantasy mystery romance biography paperback hardcover bookstore poetry writer writers characters plot ending
        sequel publish published editor draft manuscript literature journal diary bestseller""",
    "outdoors": """hiking hike camping camp mountain mountains lake fishing trail trails park river bike biking
        running run tent forest woods nature sunrise sunset beach kayak canoe boat swimming swim climbing climb
        picnic backpack waterfall views wildlife hunting garden walk walking scenery outdoors fresh air""",
}
FIRST_NAMES = _words(
    """james john mary anna emma sarah mike tom david chris jessica emily olivia sophia liam noah ethan
    jack lucy kate alex sam ben dan matt nick josh amy laura lisa paul peter steve tony maria rachel hannah grace
    chloe ella mia zoe lily ryan kevin jason brian eric adam luke michael daniel andrew jen megan nicole julia
    sophie charlotte henry oliver leo max jake"""
)
GREETINGS = ("hi", "hey", "hello", "good morning", "morning", "hi there", "hey there", "evening")
SIGN_OFFS = (
    "thanks",
    "thank you",
    "see you soon",
    "love you",
    "talk later",
    "take care",
    "cheers",
    "bye",
    "see you tomorrow",
    "have a good day",
    "good night",
    "thanks so much",
    "miss you",
)
PHRASES = (
    "on my way",
    "call me later",
    "running late",
    "be there soon",
    "sounds good",
    "no problem",
    "let me know",
    "what time",
    "are you free",
    "just got home",
    "talk to you later",
    "i'm on my way",
    "give me a call",
    "almost there",
    "can't wait",
    "leaving now",
    "at work",
    "on the way home",
    "let's meet",
    "are you home",
    "i'll be there",
    "can you pick me up",
    "how was your day",
    "i'm so sorry",
)
FILLERS = ("yeah", "okay", "cool", "awesome", "totally", "literally", "actually", "anyway", "honestly", "well", "so")
FILLERS += ("basically", "wow", "hmm", "dude", "sure", "oh", "ah")
# Sentence openers and how often each opens a sentence (relative weights).
STARTERS = {
    "i": 12, "we": 4, "you": 5, "it": 4, "that": 3, "this": 2, "so": 2, "just": 2, "the": 4, "my": 3, "what": 2,
    "how": 2, "can": 2, "do": 2, "are": 1.5, "did": 1.5, "is": 1.5, "when": 1.5, "where": 1, "there": 1,
    "they": 2, "he": 2, "she": 2, "if": 1, "maybe": 1, "no": 1, "yes": 1, "not": 0.5, "let's": 1, "i'm": 4,
    "don't": 1, "it's": 2, "that's": 1.5, "will": 0.5, "have": 1, "why": 0.5, "all": 0.5, "please": 1,
}  # fmt: skip
# Words a typed sentence does not end on: the last word is drawn again (up to _REDRAWS times), then
# dropped (while the sentence keeps two words).
OPEN_WORDS = frozenset(
    _words(
        """the a an of to and for in on with by at from or as is are was were be that this my your our their his her its
    if than but into about will can has have had i we you they he she not would could should these those which who
    very more most some any every each all such other"""
    )
)
_REDRAWS = 3
# What a one-word sentence says.
ONE_WORD_REPLIES = _words("yes no okay sure thanks maybe cool nice great done yeah perfect awesome sorry wow true why")
_MIN_TOPIC_RANK = 100  # topic words are content words: not among the 100 most frequent
_HABIT_MIN_RANK = 100
_PERSONAL_MIN_RANK = 5_000  # habits form after content words, not after "the" or "of"
QUESTION_STARTERS = frozenset(_words("what how can do are did is when where will have why could would should"))


@dataclasses.dataclass(frozen=True, eq=False)
class Lexicon:
    """Everything text generation reads, as Python lists (bisect on lists beats numpy per word)."""

    words: tuple[str, ...]  # the bigram chain's vocabulary, most frequent first
    index: dict[str, int]
    offsets: list[int]
    successors: list[int]
    cumulative: list[float]
    unigram_cumulative: list[float]  # Zipf fallback when a word has no continuation
    topics: dict[str, tuple[tuple[str, ...], np.ndarray]]  # name -> (words, base weights)
    all_words: tuple[str, ...]  # every usable word of the counts, most frequent first
    names: tuple[str, ...]
    starters: tuple[str, ...]
    starter_cumulative: list[float]


@functools.lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The generator's word statistics, built once per process from `words`."""
    chain = words.bigram_chain(words.DEFAULT_VOCABULARY)
    all_words, all_counts = words.unigrams(None)
    rank = {w: i for i, w in enumerate(all_words)}
    topics = {}
    for name, text in TOPICS.items():
        kept = [w for w in dict.fromkeys(text.split()) if rank.get(w, -1) >= _MIN_TOPIC_RANK]
        # Within a topic common words are still more common, but less steeply than Zipf.
        weights = np.sqrt(np.array([all_counts[rank[w]] for w in kept], np.float64))
        topics[name] = (tuple(kept), weights / weights.sum())
    unigram = np.cumsum(chain.counts / chain.counts.sum())
    starters = tuple(STARTERS)
    starter_weights = np.cumsum(np.array([STARTERS[s] for s in starters], np.float64))
    return Lexicon(
        words=chain.words,
        index=chain.index,
        offsets=chain.offsets.tolist(),
        successors=chain.successors.tolist(),
        cumulative=chain.cumulative.tolist(),
        unigram_cumulative=(unigram / unigram[-1]).tolist(),
        topics=topics,
        all_words=all_words,
        names=tuple(n for n in FIRST_NAMES if n in rank),
        starters=starters,
        starter_cumulative=(starter_weights / starter_weights[-1]).tolist(),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class UserProfile:
    """How one user types: the same for all their messages."""

    topics: tuple[str, ...]
    topic_cumulative: list[float]  # which of the user's topics
    topic_words: tuple[tuple[str, ...], ...]
    topic_word_cumulative: tuple[list[float], ...]  # the user's own preferences within each topic
    topic_rate: float
    temperature: float  # exponent on the chain's uniform draw: > 1 favours common continuations
    personal_words: tuple[str, ...]  # rare words of the user's life (a street, a pet, a hobby)
    personal_rate: float
    habit_rate: float
    contacts: tuple[str, ...]
    greetings: tuple[str, ...]
    greeting_rate: float
    name_rate: float
    sign_offs: tuple[str, ...]
    sign_off_rate: float
    phrases: tuple[str, ...]
    phrase_rate: float
    fillers: tuple[str, ...]
    filler_rate: float
    comma_rate: float
    end_rate: float  # how often the last sentence gets its punctuation
    exclaim_rate: float
    mean_gap_hours: float


def _pick(rng: np.random.Generator, options: Sequence[str], low: int, high: int) -> tuple[str, ...]:
    k = int(rng.integers(low, high + 1))
    return tuple(options[i] for i in rng.choice(len(options), size=min(k, len(options)), replace=False))


def sample_profile(rng: np.random.Generator, lex: Lexicon) -> UserProfile:
    """Draws a user's topics, contacts, phrases and habits."""
    names = list(lex.topics)
    k = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
    share = rng.dirichlet(np.ones(k))
    order = np.argsort(-share, kind="stable")
    chosen, share = [chosen[i] for i in order], share[order]
    topic_words, topic_cumulative = [], []
    for name in chosen:
        kept, base = lex.topics[name]
        preference = base * rng.exponential(size=len(kept))  # the user's own favourites within the topic
        topic_words.append(kept)
        topic_cumulative.append((np.cumsum(preference) / preference.sum()).tolist())
    return UserProfile(
        topics=tuple(chosen),
        topic_cumulative=np.cumsum(share).tolist(),
        topic_words=tuple(topic_words),
        topic_word_cumulative=tuple(topic_cumulative),
        topic_rate=float(rng.uniform(0.1, 0.25)),
        temperature=float(np.exp(rng.normal(0.0, 0.4))),
        personal_words=tuple(lex.all_words[r] for r in _personal_ranks(rng, len(lex.all_words))),
        personal_rate=float(rng.uniform(0.01, 0.05)),
        habit_rate=float(rng.uniform(0.2, 0.5)),
        contacts=_pick(rng, lex.names, 2, 5),
        greetings=_pick(rng, GREETINGS, 1, 2),
        greeting_rate=float(rng.uniform(0.1, 0.5)),
        name_rate=float(rng.uniform(0.3, 0.8)),
        sign_offs=_pick(rng, SIGN_OFFS, 1, 2),
        sign_off_rate=float(rng.uniform(0.05, 0.35)),
        phrases=_pick(rng, PHRASES, 2, 4),
        phrase_rate=float(rng.uniform(0.1, 0.3)),
        fillers=_pick(rng, FILLERS, 1, 3),
        filler_rate=float(rng.uniform(0.03, 0.15)),
        comma_rate=float(rng.uniform(0.02, 0.1)),
        end_rate=float(rng.uniform(0.3, 0.95)),
        exclaim_rate=float(rng.uniform(0.0, 0.4)),
        mean_gap_hours=float(np.exp(rng.normal(np.log(10.0), 0.7))),
    )


def _personal_ranks(rng: np.random.Generator, words: int) -> np.ndarray:
    """10-30 ranks log-uniform between 5,000 and the last word: globally rare, so mostly out of vocabulary."""
    k = int(rng.integers(10, 31))
    return np.exp(rng.uniform(np.log(_PERSONAL_MIN_RANK), np.log(words), size=k)).astype(np.int64)


class _Draws:
    """Uniform draws from the user's generator, fetched in blocks (one numpy call per 1024)."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._buffer: list[float] = []
        self._next = 0

    def __call__(self) -> float:
        if self._next == len(self._buffer):
            self._buffer = self._rng.random(1024).tolist()
            self._next = 0
        self._next += 1
        return self._buffer[self._next - 1]


def _choose(options: Sequence[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


class _Typist:
    """Writes one user's messages: the chain, their topics, habits and phrases."""

    def __init__(self, profile: UserProfile, lex: Lexicon, rng: np.random.Generator):
        self._p = profile
        self._lex = lex
        self._rng = rng
        self._u = _Draws(rng)
        self._habits: dict[str, str] = {}

    def _topic_word(self) -> str:
        p = self._p
        t = bisect.bisect_right(p.topic_cumulative, self._u())
        t = min(t, len(p.topics) - 1)
        cumulative = p.topic_word_cumulative[t]
        return p.topic_words[t][min(bisect.bisect_right(cumulative, self._u()), len(cumulative) - 1)]

    def _chain_word(self, current: str) -> str:
        lex = self._lex
        i = lex.index.get(current)
        if i is not None and lex.offsets[i + 1] > lex.offsets[i]:
            start, end = lex.offsets[i], lex.offsets[i + 1]
            k = bisect.bisect_right(lex.cumulative, self._u() ** self._p.temperature, start, end)
            return lex.words[lex.successors[min(k, end - 1)]]
        k = bisect.bisect_right(lex.unigram_cumulative, self._u())
        return lex.words[min(k, len(lex.words) - 1)]

    def _next_word(self, current: str) -> str:
        p, u = self._p, self._u()
        if u < p.topic_rate:
            return self._topic_word()
        if u < p.topic_rate + p.personal_rate:
            return p.personal_words[int(self._u() ** 2 * len(p.personal_words))]  # the first ones most
        if self._lex.index.get(current, _HABIT_MIN_RANK) < _HABIT_MIN_RANK:
            return self._chain_word(current)
        habit = self._habits.get(current)
        if habit is not None and self._u() < self._p.habit_rate:
            return habit
        word = self._chain_word(current)
        self._habits.setdefault(current, word)
        return word

    def _sentence(self, length: int) -> list[str]:
        """At most `length` words (punctuation not counted) with commas but no final punctuation."""
        p, u = self._p, self._u
        if length == 1:
            return [_choose(ONE_WORD_REPLIES, u())]
        if length >= 3 and u() < p.filler_rate:
            tokens = [_choose(p.fillers, u()), ","]
            tokens.append(self._lex.starters[bisect.bisect_right(self._lex.starter_cumulative, u())])
        else:
            tokens = [self._lex.starters[bisect.bisect_right(self._lex.starter_cumulative, u())]]
        count = sum(t not in PUNCTUATION for t in tokens)
        while count < length:
            if count < length - 1 and tokens[-1] not in OPEN_WORDS and u() < p.comma_rate:
                tokens.append(",")
            tokens.append(self._next_word(tokens[-1] if tokens[-1] not in PUNCTUATION else tokens[-2]))
            count += 1
        for _ in range(_REDRAWS):  # the word before the last is a word: no comma goes there
            if tokens[-1] not in OPEN_WORDS:
                break
            tokens[-1] = self._next_word(tokens[-2])
        while tokens[-1] in OPEN_WORDS and count > 2:
            tokens.pop()
            count -= 1
            if tokens[-1] in PUNCTUATION:
                tokens.pop()
        return tokens

    def _end(self, sentence: list[str], last: bool) -> list[str]:
        p, u = self._p, self._u
        if last and u() >= p.end_rate:
            return sentence
        first = next((t for t in sentence if t not in PUNCTUATION and t not in p.fillers), "")
        if first in QUESTION_STARTERS:
            return [*sentence, "?"]
        return [*sentence, "!" if u() < p.exclaim_rate else "."]

    def message(self) -> tuple[list[str], str]:
        """One message's tokens and its first question (as a title; "" if none)."""
        p, u, rng = self._p, self._u, self._rng
        length = int(min(MAX_WORDS, max(1, round(np.exp(rng.normal(np.log(MEDIAN_WORDS), WORDS_SIGMA))))))
        opening: list[str] = []
        if u() < p.greeting_rate:
            opening = _choose(p.greetings, u()).split()
            if u() < p.name_rate:
                opening.append(p.contacts[min(int(u() ** 2 * len(p.contacts)), len(p.contacts) - 1)])  # favourites
            if len(opening) > length:
                opening = opening[:length]
        closing = _choose(p.sign_offs, u()).split() if u() < p.sign_off_rate else []
        if len(opening) + len(closing) > length:
            closing = []
        body = length - len(opening) - len(closing)
        sentences = []
        while body > 0:
            phrase = _choose(p.phrases, u()).split()
            if u() < p.phrase_rate and len(phrase) <= body:
                sentences.append(phrase)  # a stock phrase is a sentence of its own
                body -= len(phrase)
                continue
            size = min(body, 3 + int(rng.poisson(5)))
            if body - size < 3:
                size = body
            sentences.append(self._sentence(size))
            body -= size
        tokens = []
        if opening:
            tokens += [*opening, *([","] if sentences and u() < 0.5 else [])]
        title = ""
        for i, sentence in enumerate(sentences):
            ended = self._end(sentence, last=i == len(sentences) - 1 and not closing)
            if ended[-1] == "?" and not title:
                title = " ".join(ended)
            tokens += ended
        if closing:
            if tokens and tokens[-1] not in PUNCTUATION:
                tokens.append(",")
            tokens += closing
            if u() < p.end_rate:
                tokens.append("!" if u() < p.exclaim_rate else ".")
        return tokens, title


def user_id(index: int) -> str:
    return f"u{index:05d}"


def split_sizes(messages: int) -> tuple[int, int, int]:
    """(train, heldout, test) messages of a user with `messages`: the latest tenth tests, one tenth before it."""
    test = int(messages * TEST_FRACTION + 0.5)
    heldout = int(messages * HELDOUT_FRACTION + 0.5)
    while test + heldout > messages - 1:  # every user keeps at least one train message
        if heldout >= test:
            heldout -= 1
        else:
            test -= 1
    return messages - heldout - test, heldout, test


def _user_plan(config: TextPopulationConfig, index: int) -> tuple[np.random.Generator, int]:
    """The user's generator and message count, the count drawn first so it is cheap to know."""
    rng = np.random.default_rng([config.seed, index])
    n = round(float(np.exp(rng.normal(np.log(config.median_messages), config.quantity_sigma))))
    return rng, max(MIN_MESSAGES, min(n, 10 * config.median_messages))


def message_count(config: TextPopulationConfig, index: int) -> int:
    return _user_plan(config, index)[1]


def train_clients(config: TextPopulationConfig) -> int:
    """Users with at least one train message, without generating any text (every user keeps one)."""
    return sum(split_sizes(message_count(config, i))[0] > 0 for i in range(config.num_users))


def _timestamp(seconds: int) -> bytes:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC").encode()


@dataclasses.dataclass(frozen=True)
class UserRows:
    """One user's rows in time order as (split, serialized example), and what the count files need."""

    index: int
    rows: list[tuple[str, bytes]]
    train_words: list[str]  # distinct tokens of their train messages, sorted
    tags: list[str]


def user_messages(config: TextPopulationConfig, index: int) -> tuple[UserProfile, list[dict]]:
    """One user's profile and messages (feature dicts in TFF Stack Overflow's schema, str/int values)."""
    rng, n = _user_plan(config, index)
    profile = sample_profile(rng, lexicon())
    typist = _Typist(profile, lexicon(), rng)
    t = _EPOCH + int(rng.integers(0, 365 * 86400))
    gaps = np.maximum(60, rng.exponential(profile.mean_gap_hours * 3600, size=n)).astype(np.int64)
    scores = rng.poisson(1.0, size=n)
    messages = []
    for i in range(n):
        t += int(gaps[i])
        tokens, title = typist.message()
        messages.append(
            {
                "tokens": " ".join(tokens),
                "title": title,
                "tags": "|".join(profile.topics),
                "creation_date": _timestamp(t).decode(),
                "score": int(scores[i]),
                "type": "question" if "?" in tokens else "answer",
            }
        )
    return profile, messages


def serialize_example(message: dict) -> bytes:
    """`tf.train.Example` with TFF Stack Overflow's features: bytes, except int64 `score`, without TF."""
    return example_proto.encode_example(
        {
            name: [message[name]] if name == "score" else [message[name].encode("utf-8")]
            for name in ("creation_date", "score", "tags", "title", "tokens", "type")
        }
    )


def _user_rows(config: TextPopulationConfig, index: int) -> UserRows:
    profile, messages = user_messages(config, index)
    n_train, n_heldout, _ = split_sizes(len(messages))
    rows, train_words = [], set()
    for i, message in enumerate(messages):
        split = "train" if i < n_train else "heldout" if i < n_train + n_heldout else "test"
        if split == "train":
            train_words.update(message["tokens"].split(" "))
        rows.append((split, serialize_example(message)))
    return UserRows(index, rows, sorted(train_words), list(profile.topics))


def _user_chunk(config: TextPopulationConfig, indices: Sequence[int]) -> list[UserRows]:
    return [_user_rows(config, i) for i in indices]


def _insert_user(con: sqlite3.Connection, user: UserRows) -> None:
    cid = user_id(user.index)
    con.executemany("INSERT INTO examples VALUES (?, ?, ?)", [(split, cid, blob) for split, blob in user.rows])
    for split in SPLITS:
        n = sum(s == split for s, _ in user.rows)
        if n:
            con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, split, n))


def word_count_lines(users_per_word: collections.Counter) -> list[str]:
    """`word<TAB>count` lines, most users first, ties by word (TFF's stackoverflow.word_count)."""
    return [f"{w}\t{n}\n" for w, n in sorted(users_per_word.items(), key=lambda item: (-item[1], item[0]))]


def generate(
    config: TextPopulationConfig,
    data_dir: str,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> None:
    """Writes the population's three Stack Overflow files into `data_dir` atomically.

    Args:
      config: the population.
      data_dir: an existing directory; temporary files beside the final ones are renamed
        over them once all three are complete, the SQLite file (which records the
        config) last.
      workers: processes writing users (None: one per core).
      progress: called with (users done, users) as chunks complete.
      stop_requested: polled between chunks; True abandons the files (`processes.Interrupted`).
    """
    words.package_dir()  # a missing word source fails here, not in a worker
    paths = [os.path.join(data_dir, name) for name in (WORD_COUNT_FILE, TAG_COUNT_FILE, FILE_NAME)]
    users_per_word: collections.Counter = collections.Counter()
    users_per_tag: collections.Counter = collections.Counter()
    with sql_files.replaced_atomically(*paths) as (word_count_tmp, tag_count_tmp, sqlite_tmp):
        with sql_files.new_database(sqlite_tmp, GENERATOR_VERSION, config) as con:
            for result in processes.map_over_ranges(
                _user_chunk,
                config,
                config.num_users,
                chunk=_CHUNK,
                processes=workers,
                progress=progress,
                stop_requested=stop_requested,
            ):
                for user in result:
                    _insert_user(con, user)
                    users_per_word.update(user.train_words)
                    users_per_tag.update(user.tags)  # every user has train messages, all with their tags
        with open(word_count_tmp, "w", encoding="utf-8") as f:
            f.writelines(word_count_lines(users_per_word))
        with open(tag_count_tmp, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(users_per_tag.items(), key=lambda item: (-item[1], item[0]))), f)


def read_config(path: str) -> TextPopulationConfig | None:
    """The configuration recorded in a generated file, or None if absent or from another version."""
    return sql_files.recorded_config(path, GENERATOR_VERSION, TextPopulationConfig)


def cached_data_dir(cache_dir: str, config: TextPopulationConfig) -> str:
    """Where this population is (or will be) generated: named after its fingerprint."""
    return os.path.join(cache_dir, f"keyboard-{config.fingerprint(GENERATOR_VERSION)}")


def is_generated(cache_dir: str, config: TextPopulationConfig) -> bool:
    data_dir = cached_data_dir(cache_dir, config)
    path = os.path.join(data_dir, FILE_NAME)
    return (
        os.path.exists(path)
        and all(os.path.exists(os.path.join(data_dir, name)) for name in (WORD_COUNT_FILE, TAG_COUNT_FILE))
        and read_config(path) == config
    )


def ensure_generated(
    cache_dir: str,
    config: TextPopulationConfig,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> str:
    """Returns a data directory holding this population's Stack Overflow files, generating them once.

    The directory is named after the configuration's fingerprint; files whose recorded
    configuration does not match (tampered, or an older generator) are regenerated.
    """
    data_dir = cached_data_dir(cache_dir, config)
    if is_generated(cache_dir, config):
        return data_dir
    sql_files.writable_directory(data_dir)
    for name in (FILE_NAME, WORD_COUNT_FILE, TAG_COUNT_FILE):
        sql_files.remove_stale_temporaries(os.path.join(data_dir, name))
    generate(config, data_dir, workers=workers, progress=progress, stop_requested=stop_requested)
    return data_dir
