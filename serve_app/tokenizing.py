"""open_clip's tokenizer with bounded work and memory per text: the same tokens, at a cost that does not grow
with what a text holds beyond the model's context.

open_clip's `SimpleTokenizer` encodes a whole text before cutting it to the context (77 tokens), runs its BPE
in time quadratic in a word's length (one 20,000-letter word: minutes), and keeps every word it has seen in a
cache that never shrinks. `BoundedTokenizer` keeps open_clip's cleaning, pre-token pattern, vocabulary and
BPE ranks (the tokenizer's own attributes) and changes only how much of that work is done:

- Encoding stops once the context is full: every pre-token (a word, a digit, a punctuation run) yields at
  least one BPE token, and tokens past the context are cut by open_clip anyway, so the rest of the text
  cannot change the result.
- Words go through `merge_word`, open_clip's merges in the same order in O(n log n) (its own `bpe` is quadratic
  in a word's length); short ones are cached in a bounded cache (`BoundedCache`; open_clip's grows forever).

Other tokenizers (Hugging Face ones, open_clip's reduction masks) are used as they are: their own code
truncates.
"""

import heapq
from collections import OrderedDict
from threading import Lock
from typing import Any

import torch

# Words of at most this many byte-symbols are cached once merged.
CACHED_WORD_SYMBOLS = 64
# Texts that `cheap_to_tokenize` lets a caller tokenize on its event loop.
INLINE_CHARS = 1024
INLINE_LINE_BREAKS = 16
# Texts longer than this are cleaned from a prefix that ends at a line break (`BoundedTokenizer.encode`).
PREFIX_CHARS = 2048
# Words a tokenizer's cache keeps (each at most CACHED_WORD_SYMBOLS symbols, so well under a megabyte in all).
DEFAULT_CACHE_WORDS = 20_000


class BoundedCache:
    """Words already merged, bounded: the oldest goes once `capacity` is passed. Read without a lock (a dict
    lookup is atomic), written under one: the preprocessor tokenizes from several threads at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._words: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = Lock()

    def get(self, word: str) -> list[str] | None:
        return self._words.get(word)

    def put(self, word: str, pieces: list[str]) -> None:
        with self._lock:
            self._words[word] = pieces
            while len(self._words) > self.capacity:
                self._words.popitem(last=False)

    def __len__(self) -> int:
        return len(self._words)

    def __iter__(self):
        return iter(list(self._words))


def merge_word(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE symbols of one byte-encoded word, exactly as `SimpleTokenizer.bpe` computes them.

    `bpe` repeatedly takes the lowest-ranked adjacent pair and merges all its occurrences left to right.
    A heap ordered by (rank, position) pops the same merges in the same order: a merge (a, b) only creates
    pairs with the new symbol `ab`, and every merge rule that uses `ab` was learned after it (a higher rank),
    so all occurrences of the lowest pair are merged, leftmost first, before any pair they create. A heap
    entry is stale once either of its symbols has changed (symbols only grow, so equal means unchanged).
    """
    symbols: list[str | None] = [*token[:-1], token[-1] + "</w>"]
    count = len(symbols)
    following = list(range(1, count + 1))
    following[-1] = -1
    preceding = list(range(-1, count - 1))
    heap = [
        (ranks[pair], i, *pair)
        for i, pair in enumerate(zip(symbols, symbols[1:]))
        if pair in ranks
    ]
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = following[i]
        if j < 0 or symbols[i] != left or symbols[j] != right:
            continue
        merged = left + right
        symbols[i], symbols[j] = merged, None
        after = following[j]
        following[i] = after
        if after >= 0:
            preceding[after] = i
            rank = ranks.get((merged, symbols[after]))
            if rank is not None:
                heapq.heappush(heap, (rank, i, merged, symbols[after]))
        before = preceding[i]
        if before >= 0:
            rank = ranks.get((symbols[before], merged))
            if rank is not None:
                heapq.heappush(heap, (rank, before, symbols[before], merged))
    return [s for s in symbols if s is not None]


class BoundedTokenizer:
    """Callable as open_clip's tokenizer (`tokenizer(texts) -> (N, context_length) int64`), same tokens."""

    def __init__(self, tokenizer: Any, cache_words: int = DEFAULT_CACHE_WORDS) -> None:
        self.inner = tokenizer
        self.context_length = tokenizer.context_length
        self.bounded = _is_simple_tokenizer(tokenizer)
        if self.bounded:
            # open_clip's own cache holds the special tokens, which its `bpe` leaves whole; ours does the same.
            self.specials = frozenset(k for k, v in tokenizer.cache.items() if k == v)
            self.cache = BoundedCache(cache_words)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if not self.bounded:
            return self.inner(texts)
        if isinstance(texts, str):
            texts = [texts]
        tok = self.inner
        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [tok.sot_token_id, *self.encode(text, self.context_length - 2), tok.eot_token_id]
            result[row, : len(tokens)] = torch.tensor(tokens)
        return result

    def _pieces(self, word: str) -> list[str]:
        """A byte-encoded word's BPE symbols: `merge_word`, the same merges as open_clip's `bpe`, cached for
        short words; special tokens whole, as open_clip's cache keeps them."""
        if word in self.specials:
            return [word]
        pieces = self.cache.get(word)
        if pieces is None:
            pieces = merge_word(word, self.inner.bpe_ranks)
            if len(word) <= CACHED_WORD_SYMBOLS:
                self.cache.put(word, pieces)
        return pieces

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """The first `max_tokens` tokens of `tok.encode(text)`, cleaning and encoding no more of the text than
        that needs.

        Cleaning (ftfy, HTML unescaping, whitespace) costs time per line, and open_clip cleans a whole text first.
        Here it runs on a prefix that ends at a line break, doubled until its tokens fill the context: ftfy fixes
        a text line by line in order (a line's fixes depend only on it and the lines before), no HTML entity
        spans a line break, and whitespace separates pre-tokens, so the prefix's tokens are the whole text's
        first ones."""
        end = PREFIX_CHARS
        while len(text) > end:
            cut = text.find("\n", end)
            if cut < 0:
                break
            tokens = self._encode_clean(text[: cut + 1], max_tokens)
            if len(tokens) >= max_tokens:
                return tokens
            end = 2 * (cut + 1)
        return self._encode_clean(text, max_tokens)

    def _encode_clean(self, text: str, max_tokens: int) -> list[int]:
        tok = self.inner
        tokens: list[int] = []
        for match in tok.pat.finditer(tok.clean_fn(text)):
            word = "".join(tok.byte_encoder[b] for b in match.group().encode("utf-8"))
            pieces = self._pieces(word)
            tokens.extend(tok.encoder[piece] for piece in pieces)
            if len(tokens) >= max_tokens:
                return tokens[:max_tokens]
        return tokens


def cheap_to_tokenize(texts: list[str]) -> bool:
    """Whether tokenizing `texts` takes at most a few milliseconds of an event loop: few characters (a long
    emoji run merges 4 byte-symbols a character) and few line breaks (cleaning costs per line)."""
    return sum(map(len, texts)) <= INLINE_CHARS and sum(t.count("\n") for t in texts) <= INLINE_LINE_BREAKS


def _is_simple_tokenizer(tokenizer: Any) -> bool:
    from open_clip.tokenizer import SimpleTokenizer

    return isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None
