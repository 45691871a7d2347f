"""The bounded tokenizer gives open_clip's own tokens, at a cost and memory that do not grow with the text."""

import random
import string

import open_clip
import pytest
import torch

from serve_app.tokenizing import CACHED_WORD_SYMBOLS, BoundedCache, BoundedTokenizer, merge_word

PARAGRAPHS = [
    # ASCII, longer than the context
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. " * 12,
    # accents and typographic punctuation
    "Ça coûte 10 € — naïve café, Smörgåsbord à la crème brûlée; «citation» and “quotes”. " * 20,
    # CJK: sentences without spaces (long pre-tokens) and full-width punctuation
    "東京は日本の首都であり、世界最大の都市圏の一つです。北京是中华人民共和国的首都，也是全国的政治中心。" * 15,
    # HTML entities (open_clip unescapes them twice) and markup
    "Fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;quoted&quot; &#233;t&#233; &nbsp; " * 30,
    # emoji, ZWJ sequences and flags
    "Party time 🎉🎉 with family 👨‍👩‍👧‍👦 in 🇫🇷 and 🇯🇵! 😀😃😄 " * 25,
    # special tokens typed by a client, digits, punctuation runs
    "<start_of_text> 3.14159 26535 !!!??? ... <end_of_text> price: $1,299.99 (-15%) " * 20,
    "short caption",
    "x" * 2000,  # one long word: compared with open_clip's quadratic BPE at a size it still finishes quickly
]


@pytest.fixture(scope="module")
def tokenizers():
    reference = open_clip.tokenizer.SimpleTokenizer()
    return reference, BoundedTokenizer(open_clip.tokenizer.SimpleTokenizer(), cache_words=256)


@pytest.mark.parametrize("index", range(len(PARAGRAPHS)))
def test_same_tokens_as_open_clip_on_real_paragraphs(tokenizers, index):
    reference, bounded = tokenizers
    text = PARAGRAPHS[index]
    assert torch.equal(bounded([text]), reference([text]))


def test_same_tokens_for_a_batch_and_texts_shorter_than_the_context(tokenizers):
    reference, bounded = tokenizers
    texts = ["a photo of a cat", "a dog", " ", "77 tokens " * 10]
    assert torch.equal(bounded(texts), reference(texts))


def test_merge_word_equals_open_clips_bpe_on_random_words():
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    rng = random.Random(0)
    alphabets = ["abcdeht", string.ascii_lowercase, "aab", "éüñ漢字語😀" + string.ascii_lowercase]
    for n in range(1500):
        length = rng.choice([1, 2, 5, 20, 70, 150, 400])
        text = "".join(rng.choice(alphabets[n % len(alphabets)]) for _ in range(length))
        word = "".join(tokenizer.byte_encoder[b] for b in text.encode("utf-8"))
        assert merge_word(word, tokenizer.bpe_ranks) == tokenizer.bpe(word).split(" "), text


def test_the_word_cache_stays_bounded_and_special_tokens_stay_whole():
    tokenizer = BoundedTokenizer(open_clip.tokenizer.SimpleTokenizer(), cache_words=100)
    rng = random.Random(1)
    for _ in range(50):
        tokenizer([" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(60))])
    cache = tokenizer.cache
    assert isinstance(cache, BoundedCache) and len(cache) <= 100
    assert all(len(word) <= CACHED_WORD_SYMBOLS for word in cache)
    assert len(tokenizer.inner.cache) == 2  # open_clip's own cache (its special tokens) is never written to
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ["<start_of_text> hi", "a <end_of_text> b <START_OF_TEXT>"]:
        assert torch.equal(tokenizer([text]), reference([text]))


def test_degenerate_texts_cost_bounded_work(monkeypatch):
    """One 20,000-letter word (minutes in open_clip's BPE), 16,000 characters without a space and a text of
    8,000 words: the symbols merged stay within each text's own length, and the long text stops at its 75th
    word; counted, not timed."""
    import serve_app.tokenizing as tokenizing

    merged = []
    merge = tokenizing.merge_word
    monkeypatch.setattr(tokenizing, "merge_word", lambda word, ranks: merged.append(len(word)) or merge(word, ranks))
    tokenizer = BoundedTokenizer(open_clip.tokenizer.SimpleTokenizer())
    rng = random.Random(2)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(20_000))
    tokens = tokenizer([word, "漢" * 16_000, "a " * 8000])
    assert tokens.shape == (3, 77) and bool((tokens[:, -1] == tokenizer.inner.eot_token_id).all())
    assert sorted(merged, reverse=True)[:2] == [48_000, 20_000] and len(merged) <= 2 + 1  # "a" merged once


def test_what_an_event_loop_may_tokenize_itself():
    from serve_app.tokenizing import cheap_to_tokenize

    assert cheap_to_tokenize(["a photo of a cat"] * 16)
    assert not cheap_to_tokenize(["\n" * 100])
    assert not cheap_to_tokenize(["x" * 2000])


def test_other_tokenizers_are_used_as_they_are():
    class Other:
        context_length = 77

        def __call__(self, texts):
            return torch.ones(len(texts), 77, dtype=torch.long)

    bounded = BoundedTokenizer(Other())
    assert not bounded.bounded and bounded(["a", "b"]).shape == (2, 77)


def test_long_texts_of_many_lines_are_cleaned_from_a_prefix_with_the_same_tokens(tokenizers):
    reference, bounded = tokenizers
    rng = random.Random(3)
    pieces = ["the", "Café", "&amp;", "<b>", "naïve", "漢字", "😀", "Ã©", "\x00", "\u200b", "line", "&lt;tag&gt;", "'s",
              "3.14", "—", "\r\n", "\n", "\n\n", "Fish &amp;amp; chips"]
    for _ in range(60):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(200, 3000)))
        assert torch.equal(bounded([text]), reference([text])), text[:200]
    calls = []
    clean = bounded.inner.clean_fn
    bounded.inner.clean_fn = lambda t: calls.append(len(t)) or clean(t)
    bounded(["word " * 10 + "\n" + "more words\n" * 1500])
    bounded.inner.clean_fn = clean
    assert max(calls) < 5000  # a prefix of the 16,500 characters was enough for 77 tokens
