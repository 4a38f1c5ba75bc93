"""ClipTokenizer against open_clip's tokenizer (an independent implementation of CLIP's BPE).

The parity set is generated deterministically: plain and mixed-case English, accents,
other scripts, CJK, HTML entities, emoji (with modifiers and joiners), punctuation runs,
numbers, contractions (straight and curly), mojibake, odd whitespace, 500-word captions,
the empty string and whitespace-only strings.
"""
import random

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from modules.tokenization_clip import ClipTokenizer

MAX_WORDS = 32
NUM_GENERATED = 1000
NUM_LONG = 6
LONG_WORDS = 500

FRAGMENTS = {
    "english": ["a", "man", "is", "playing", "guitar", "on", "the", "stage", "Woman", "COOKING",
                "pasta", "in", "kitchen", "dog", "runs", "across", "field", "people", "dancing",
                "video", "game", "cartoon", "characters", "talk", "news", "anchor", "reports",
                "soccer", "match", "highlights", "unbelievable", "tokenization", "XYZZY"],
    "accents": ["café", "naïve", "résumé", "Ångström", "jalapeño", "Zürich", "façade", "São",
                "Dvořák", "Œuvre", "straße", "İstanbul", "e\u0301clair", "ΣΊΣΥΦΟΣ", "Москва",
                "Ελληνικά", "עברית", "العربية", "हिन्दी", "ภาษาไทย"],
    "cjk": ["漢字", "日本語のテキスト", "한국어", "中文字幕", "カタカナ", "ＡＢＣ１２３", "東京タワー",
            "「引用」", "。", "、"],
    "html": ["&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&nbsp;", "&#x27;", "&amp;amp;", "&copy;",
             "&eacute;", "&#8217;", "&lt;", "&gt;", "<br>", "</p>"],
    "emoji": ["😀", "👍🏽", "🇺🇸", "👨\u200d👩\u200d👧", "❤️", "🎉🎉", "🔥", "🤖", "☕", "✨"],
    "punctuation": ["!!!", "?!?", "...", "---", "***", "(", ")", '"quoted"', "'single'", "#tag",
                    "@user", "a/b", "50%", "$3.99", "~~~", ",,", ";", ":-)", "…", "—", "«»", "!", "?"],
    "numbers": ["2024", "3.14159", "1,000,000", "42nd", "10x", "0.5", "7", "1990s", "٣", "½", "²"],
    "contractions": ["don't", "it's", "they're", "I've", "we'll", "she'd", "I'm", "DON'T",
                     "rock'n'roll", "o'clock", "it’s", "can’t", "'s", "'ll"],
    "mojibake": ["cafÃ©", "Ã¼ber", "â€œquotedâ€\x9d", "donâ€™t"],
    "whitespace": ["\t", "\n", "  ", "\u00a0", "\u2003", "\r\n", "\u3000", "\u200b", "\ufeff"],
    "misc": ["https://example.com/a?b=c&d=e", "user@mail.org", "C++", "snake_case", "CamelCase",
             "v1.2.3", "#1", "A.I.", "x86_64", "\x00", "\x07"],
}
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n"]


def random_caption(rng: random.Random, num_fragments: int) -> str:
    """A caption of num_fragments pieces drawn from mixed categories and random code points."""
    pieces = []
    for _ in range(num_fragments):
        if rng.random() < 0.1:
            pieces.append(chr(rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x370, 0x1FFF),
                                          rng.randint(0x3000, 0x9FFF), rng.randint(0x1F300, 0x1FAFF)])))
        else:
            pieces.append(rng.choice(FRAGMENTS[rng.choice(sorted(FRAGMENTS))]))
        pieces.append(rng.choice(SEPARATORS))
    return "".join(pieces)


def parity_captions() -> list[str]:
    rng = random.Random(20250611)
    captions = ["", " ", "   \t\n ", "\u3000\u00a0"]
    captions += [random_caption(rng, rng.randint(1, 30)) for _ in range(NUM_GENERATED)]
    long_words = FRAGMENTS["english"] + FRAGMENTS["accents"] + FRAGMENTS["contractions"]
    captions += [" ".join(rng.choice(long_words) for _ in range(LONG_WORDS)) for _ in range(NUM_LONG)]
    return captions


@pytest.fixture(scope="module")
def tokenizers():
    return ClipTokenizer(), SimpleTokenizer()


def test_special_ids_and_vocab(tokenizers):
    ours, ref = tokenizers
    assert ours.vocab_size == ref.vocab_size == 49408
    assert (ours.sot_token_id, ours.eot_token_id) == (ref.sot_token_id, ref.eot_token_id)
    assert ours.eot_token_id == ours.vocab_size - 1


def test_encode_matches_open_clip(tokenizers):
    ours, ref = tokenizers
    captions = parity_captions()
    mismatches = [c for c in captions if ours.encode(c) != ref.encode(c)]
    print(f"tokenizer encode agreement: {len(captions) - len(mismatches)}/{len(captions)}")
    assert not mismatches, f"{len(mismatches)} captions differ, first: {mismatches[:3]!r}"


def test_tokenize_batch_matches_open_clip(tokenizers):
    ours, ref = tokenizers
    captions = parity_captions()
    ids, mask = ours.tokenize_batch(captions, max_words=MAX_WORDS)
    ref_ids = ref(captions, context_length=MAX_WORDS)
    lengths = torch.tensor([min(len(ref.encode(c)) + 2, MAX_WORDS) for c in captions])
    ref_mask = (torch.arange(MAX_WORDS)[None, :] < lengths[:, None]).long()
    agree = int(((ids == ref_ids).all(1) & (mask == ref_mask).all(1)).sum())
    print(f"tokenize_batch(max_words={MAX_WORDS}) agreement: {agree}/{len(captions)}")
    assert ids.shape == mask.shape == (len(captions), MAX_WORDS)
    assert ids.dtype == mask.dtype == torch.long
    assert agree == len(captions)


def test_truncation_and_padding(tokenizers):
    ours, _ = tokenizers
    long_caption = " ".join(["guitar"] * 100)
    ids, mask = ours.tokenize_batch(["", long_caption, "a dog"], max_words=8)
    sot, eot = ours.sot_token_id, ours.eot_token_id
    assert ids[0].tolist() == [sot, eot] + [0] * 6 and mask[0].tolist() == [1, 1] + [0] * 6
    guitar = ours.encode("guitar")
    assert len(guitar) == 1
    assert ids[1].tolist() == [sot] + guitar * 6 + [eot] and mask[1].tolist() == [1] * 8
    assert ids[2].tolist()[:4] == [sot, *ours.encode("a dog"), eot] and mask[2].sum() == 4


def test_exclamation_is_id_zero_and_masked_as_real(tokenizers):
    # id 0 is a real token, so a mask from ids != 0 would be wrong; ours records lengths.
    ours, _ = tokenizers
    ids, mask = ours.tokenize_batch(["a !~"], max_words=6)
    assert ours.encode("!~")[0] == 0 and ids[0, 2] == 0
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0]


def test_decode_round_trip(tokenizers):
    ours, _ = tokenizers
    text = "a man is playing guitar café 日本語 👍"
    assert ours.decode(ours.encode(text)) == "".join(w + " " for w in text.split())


def test_word_cache_is_used(tokenizers):
    ours, _ = tokenizers
    ours.encode("zyzzogeton")
    cached = {w: list(v) for w, v in ours._word_cache.items()}
    ours.encode("zyzzogeton zyzzogeton")
    assert {w: list(v) for w, v in ours._word_cache.items()} == cached


@pytest.mark.parametrize("bad, index, type_name", [
    (["ok", None], 1, "NoneType"),
    (["ok", "fine", 3.5], 2, "float"),
    ([b"bytes"], 0, "bytes"),
])
def test_non_string_caption_raises(tokenizers, bad, index, type_name):
    ours, _ = tokenizers
    with pytest.raises(TypeError, match=rf"index {index} is {type_name}"):
        ours.tokenize_batch(bad, max_words=MAX_WORDS)


def test_bad_arguments_raise(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(TypeError, match="list of str"):
        ours.tokenize_batch("a single string", max_words=MAX_WORDS)
    with pytest.raises(TypeError, match="expects a str"):
        ours.encode(42)
    with pytest.raises(ValueError, match="max_words=1"):
        ours.tokenize_batch(["a"], max_words=1)


def test_missing_vocabulary_file_names_path(tmp_path):
    missing = tmp_path / "nowhere.txt.gz"
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz"):
        ClipTokenizer(bpe_path=str(missing))


def test_openai_special_token_text_maps_to_special_ids(tokenizers):
    # OpenAI's tokenizer (which CLIP4Clip/AVIGATE use) reads its own special-token strings as
    # the special ids; open_clip renamed them, so this case is outside the parity set.
    ours, _ = tokenizers
    assert ours.encode("a <|endoftext|> b") == [*ours.encode("a"), ours.eot_token_id, *ours.encode("b")]
    assert ours.encode("<|startoftext|>") == [ours.sot_token_id]
