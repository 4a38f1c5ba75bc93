"""CLIP's byte-level BPE tokenizer (docs/design.md §1 Text).

Text is cleaned the way CLIP was trained (ftfy repair, HTML unescaped twice, whitespace
collapsed, lower-cased), split into words by CLIP's regular expression, and each word's
UTF-8 bytes are mapped to printable symbols and merged by the 48,894 ranked BPE merges of
``bpe_simple_vocab_16e6.txt.gz``. The vocabulary (49,408 ids) is: 256 byte symbols, the
same 256 marked end-of-word, one entry per merge, then ``<|startoftext|>`` and
``<|endoftext|>``, so the end token has the largest id (the text tower pools at it).

Shapes: N captions, L = max_words tokens.
"""
from __future__ import annotations

import gzip
import html
import os
from collections.abc import Sequence

import ftfy
import regex
import torch

DEFAULT_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (after its version line), which
# with 2 x 256 byte symbols and the 2 special tokens gives the 49,408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2
# CLIP's word splitter: the special tokens, English contractions, letter runs, single
# digits, and runs of anything else that is not whitespace.
WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def byte_symbols() -> dict[int, str]:
    """Byte value -> the printable character standing for it, in CLIP's vocabulary order.

    Bytes that print as themselves (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) keep their
    character; the other 68 get characters from U+0100 upward, in byte order, so no
    symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    remaining = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(remaining)})
    return table


def clean_text(text: str) -> str:
    """CLIP's normalisation: repair mojibake, unescape HTML (twice), collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def read_merges(bpe_path: str) -> list[tuple[str, str]]:
    """The ranked merge list of a gzipped CLIP BPE file (first line is a version header)."""
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found: {bpe_path}. It ships with this repository as "
            f"modules/bpe_simple_vocab_16e6.txt.gz (the file of OpenAI's CLIP release).")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ValueError(f"{bpe_path} is not a CLIP BPE file: expected {NUM_MERGES} merge lines "
                         f"of two symbols, got {len(merges)} lines ({len(bad)} malformed)")
    return merges


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair`` in ``symbols``, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class ClipTokenizer:
    """CLIP's tokenizer: text -> BPE ids, and batches of captions -> padded id/mask tensors.

    Args:
        bpe_path: gzipped merge list (default: the CLIP vocabulary shipped in modules/).
    """

    def __init__(self, bpe_path: str = DEFAULT_BPE_PATH):
        merges = read_merges(bpe_path)
        self.byte_encoder = byte_symbols()
        self.byte_decoder = {s: b for b, s in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self._word_cache: dict[str, list[int]] = {}

    def _bpe_ids(self, word: str) -> list[int]:
        """One word (byte symbols) -> its BPE ids; merges the lowest-ranked adjacent pair until none applies."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self.merge_ranks[p], p) for p in zip(symbols, symbols[1:]) if p in self.merge_ranks]
            if not ranked:
                break
            symbols = merge_pair(symbols, min(ranked)[1])
        ids = [self.encoder[s] for s in symbols]
        self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Caption -> BPE ids, without start/end tokens (an empty caption gives [])."""
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer.encode expects a str, got {type(text).__name__}")
        ids = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            if word in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.encoder[word])
            else:
                ids.extend(self._bpe_ids("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """BPE ids -> text (cleaned, lower-cased; words end with a space)."""
        symbols = "".join(self.decoder[int(i)] for i in ids)
        raw = bytes(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return raw.replace(END_OF_WORD, " ")

    def tokenize_batch(self, texts: Sequence[str], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (ids [N, L], mask [N, L]) with L = max_words.

        Each row is [sot] + the caption's first max_words - 2 tokens + [eot], zero-padded;
        mask is 1 on the real tokens (id 0 is the byte "!", so the mask is the only
        reliable record of length).
        """
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"tokenize_batch expects a list of str captions, got {type(texts).__name__}")
        if max_words < 2:
            raise ValueError(f"max_words={max_words} leaves no room for the start and end tokens (need >= 2)")
        ids = torch.zeros(len(texts), max_words, dtype=torch.long)
        mask = torch.zeros(len(texts), max_words, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption at index {row} is {type(text).__name__}, expected str: {text!r}")
            tokens = [self.sot_token_id, *self.encode(text)[: max_words - 2], self.eot_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask
