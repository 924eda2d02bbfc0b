"""Real English word statistics for the keyboard generator: Zipfian unigrams and a bigram chain.

The counts are the frequency dictionaries shipped with the PyPI package symspellpy 6.10.1
(code MIT): `frequency_dictionary_en_82_765.txt` ("word count") and
`frequency_bigramdictionary_en_243_342.txt` ("w1 w2 count"), Google Books Ngram counts
(CC BY 3.0) intersected with the SCOWL word list. Only the two text files are read; the
package itself is never imported (it may pull optional dependencies).

The files hold web-crawled spam as well as English. A short list of explicit and spam
terms is left out, and so are bigrams of two words that mostly keep such company ("hot
teen" goes, "hot coffee" stays), so generated messages read like a person's; single
letters other than "a" and "i" are left out too. Everything is cached per process: a
generator worker reads the files once (under a second).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import os
import re

import numpy as np

from tffpipe import errors

PACKAGE = "symspellpy"
UNIGRAM_FILE = "frequency_dictionary_en_82_765.txt"
BIGRAM_FILE = "frequency_bigramdictionary_en_243_342.txt"
SOURCE = (
    "English word and bigram counts from Google Books Ngram data (CC BY 3.0) intersected with SCOWL, "
    "as shipped in symspellpy 6.10.1 (MIT)"
)
DEFAULT_VOCABULARY = 20_000  # the working vocabulary of the bigram chain
# A word with more than this share of its bigram count next to an excluded term keeps spam
# company; a bigram of two such words is left out of the chain.
SPAM_SHARE = 0.1

_WORD = re.compile(r"^(?:[a-z]{2,}|a|i|[a-z]+'[a-z]+)$")
# Spam of the web crawl behind the counts: kept out of generated messages.
_EXCLUDED = frozenset(
    str.split(
        """
    sex sexy porn porno pornography xxx fuck fucking fucked nude nudes naked viagra cialis casino casinos shit
    pussy dick cock cocks tits boobs anal milf milfs escort escorts hentai erotic bitch bitches slut sluts
    horny blowjob cum penis vagina orgasm hardcore fetish bondage incest rape gangbang shemale tranny dildo
    xanax phentermine tramadol valium levitra propecia poker gambling bdsm whore nigger faggot cunt bestiality
    zoophilia blowjobs orgy orgies squirting fingering preteen lolita twink twinks threesome dildos vibrator
    vibrators nipples topless tit boob facials kinky swinger swingers
    """
    )
)


def package_dir() -> str:
    """The directory of the installed symspellpy package (its data files), without importing it.

    Raises:
      errors.InputError: if the package or its frequency files are missing (`make env` installs them).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise errors.InputError(
            f"{PACKAGE} (English word counts for the keyboard data) is not installed; run `make env`"
        )
    directory = list(spec.submodule_search_locations)[0]
    for name in (UNIGRAM_FILE, BIGRAM_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise errors.InputError(f"{PACKAGE} in {directory} lacks {name}; reinstall it with `make env`")
    return directory


def is_usable(word: str) -> bool:
    """A lowercase English word (or contraction) that is not crawl spam."""
    return bool(_WORD.match(word)) and word not in _EXCLUDED


@functools.cache
def _all_unigrams() -> tuple[tuple[str, ...], np.ndarray]:
    words, counts = [], []
    with open(os.path.join(package_dir(), UNIGRAM_FILE), encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and is_usable(parts[0]):
                words.append(parts[0])
                counts.append(int(parts[1]))
    order = np.argsort(-np.array(counts, np.int64), kind="stable")  # the file is sorted but for its tail
    return tuple(words[i] for i in order), np.array(counts, np.int64)[order]


def unigrams(n: int | None = DEFAULT_VOCABULARY) -> tuple[tuple[str, ...], np.ndarray]:
    """The `n` (None: all) most frequent usable words and their corpus counts, most frequent first (Zipfian)."""
    words, counts = _all_unigrams()
    if n is None:
        return words, counts
    if n > len(words):
        raise ValueError(f"n must be at most {len(words)} (the usable words of {UNIGRAM_FILE}), got {n}")
    return words[:n], counts[:n]


@dataclasses.dataclass(frozen=True, eq=False)
class BigramChain:
    """A first-order Markov chain over a working vocabulary, in CSR form.

    Word `w`'s successors are `successors[offsets[w]:offsets[w + 1]]`, ordered by
    descending count, with `cumulative` their running transition probabilities (the
    last is 1.0) and `pair_counts` the bigram counts behind them.

    Attributes:
      words: the vocabulary, most frequent first (index = rank).
      counts: corpus count of each word.
      offsets: int64 [V + 1] row starts.
      successors: int32 word indices.
      cumulative: float64 cumulative probabilities, per row.
      pair_counts: int64 bigram counts, per row.
    """

    words: tuple[str, ...]
    counts: np.ndarray
    offsets: np.ndarray
    successors: np.ndarray
    cumulative: np.ndarray
    pair_counts: np.ndarray

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def next_word(self, word: int, u: float) -> int:
        """The successor of `word` at uniform draw `u` in [0, 1); -1 if it has none."""
        start, end = self.offsets[word], self.offsets[word + 1]
        if start == end:
            return -1
        k = int(np.searchsorted(self.cumulative[start:end], u, side="right"))
        return int(self.successors[start + min(k, end - start - 1)])


@functools.cache
def _bigrams() -> tuple[list[tuple[str, str, int]], dict[str, float]]:
    """Every bigram line as (w1, w2, count), and each word's share of bigram count next to a spam term."""
    rows, mass, spam = [], collections.Counter(), collections.Counter()
    with open(os.path.join(package_dir(), BIGRAM_FILE), encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            a, b, count = parts[0], parts[1], int(parts[2])
            rows.append((a, b, count))
            mass[a] += count
            mass[b] += count
            if b in _EXCLUDED:
                spam[a] += count
            if a in _EXCLUDED:
                spam[b] += count
    return rows, {w: spam[w] / mass[w] for w in spam}


def is_spam_pair(first: str, second: str) -> bool:
    """A bigram of two words that both keep company with spam terms ("hot teen"; "hot coffee" is fine)."""
    share = _bigrams()[1]
    return share.get(first, 0.0) > SPAM_SHARE and share.get(second, 0.0) > SPAM_SHARE


@functools.lru_cache(maxsize=4)
def bigram_chain(vocab_size: int = DEFAULT_VOCABULARY) -> BigramChain:
    """The bigram transitions among the `vocab_size` most frequent usable words, spam pairs left out."""
    words, counts = unigrams(vocab_size)
    index = {w: i for i, w in enumerate(words)}
    first, second, pair = [], [], []
    for a_word, b_word, count in _bigrams()[0]:
        a, b = index.get(a_word), index.get(b_word)
        if a is not None and b is not None and not is_spam_pair(a_word, b_word):
            first.append(a)
            second.append(b)
            pair.append(count)
    first_arr, second_arr, pair_arr = np.array(first, np.int64), np.array(second, np.int32), np.array(pair, np.int64)
    order = np.lexsort((second_arr, -pair_arr, first_arr))  # by w1, then count descending, then w2
    first_arr, second_arr, pair_arr = first_arr[order], second_arr[order], pair_arr[order]
    offsets = np.zeros(vocab_size + 1, np.int64)
    np.add.at(offsets, first_arr + 1, 1)
    offsets = np.cumsum(offsets)
    running = np.cumsum(pair_arr.astype(np.float64))
    row_start = np.concatenate([[0.0], running])[offsets[first_arr]]
    row_total = running[offsets[first_arr + 1] - 1] - row_start
    cumulative = (running - row_start) / row_total
    cumulative[offsets[1:][np.diff(offsets) > 0] - 1] = 1.0  # exact row ends despite rounding
    return BigramChain(words, counts, offsets, second_arr, cumulative, pair_arr)
