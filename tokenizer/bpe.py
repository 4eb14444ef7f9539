"""
Byte-level BPE (byte pair encoding), trained from scratch.

The idea in four lines:
  1. Text is UTF-8 bytes, so the 256 byte values are the first 256 tokens: any
     string can be encoded, nothing is ever "unknown".
  2. Count every pair of adjacent tokens in the training text.
  3. Merge the most frequent pair into a new token (id 256, 257, ...) everywhere.
  4. Repeat until the vocabulary is as large as we want. The list of merges, in
     order, *is* the tokenizer.

Before counting, a regex cuts text into pre-tokens ("chunks": words, numbers,
punctuation, whitespace) and merges never cross a chunk boundary, so a token is
never "dog." or "e t", and tokens stay meaningful.

This file holds the trainer (`train_bpe`) and a slow, readable encoder
(`encode_reference`). At run time tokenizer.py hands the learned merges to
tiktoken, which gives the same ids, in Rust and on several threads
(bench/bench_tokenizer.py measures how much faster).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable

import regex  # the `regex` module: like `re`, but knows Unicode classes such as \p{L} and \p{Han}
from tqdm import tqdm

# ---------------------------------------------------------------------------
# 1. Pre-tokenization: how text is cut into chunks before BPE sees it
# ---------------------------------------------------------------------------
# GPT-4's pattern (cl100k), adapted for Chinese. Alternatives are tried left to
# right at each position and the first that matches wins:
#
#   's 't 're 've 'm 'll 'd    English contractions are their own chunk
#   你                         ONE Han character is one chunk. Chinese has no spaces,
#                              so GPT-4's "run of letters" would swallow a whole
#                              sentence as one chunk and BPE would learn tokens that
#                              straddle character boundaries (the 2nd half of one
#                              character glued to the 1st half of the next). With
#                              one chunk per character, BPE can only assemble the
#                              UTF-8 bytes of a character into that character, so
#                              every Chinese token is a whole character. Classical
#                              Chinese (our poems) is mostly one-character words
#                              anyway; multi-character words are the model's job.
#   " hello"                   a run of (non-Han) letters, with one optional
#                              leading space or ASCII punctuation mark; CJK
#                              punctuation (，。「」) never sticks to a word
#   123                        numbers in groups of at most 3 digits
#   " ..."  "。\n"             a run of punctuation/symbols (+ trailing newlines)
#   "\n\n"  "   "              whitespace; `\s+(?!\S)` leaves the last space of a
#                              run to become the " " prefix of the next word
#
# Han characters are also excluded from the letter, number and symbol classes
# (a few Han-script characters, like 〇, are numbers or symbols in Unicode), so
# "each Han character is its own chunk" holds with no exception.
#
# The pattern must give identical chunks in Python's `regex` module (used by the
# trainer and the reference encoder) and in tiktoken's Rust regex engine (used at
# run time): it uses only features both share, and tests check they agree.
# (One known gap: characters added in the newest Unicode version may be
# classified differently, as Rust's Unicode tables lag Python's `regex`. That can
# only change how such rare characters are cut into tokens, never the round trip.)
CJK_PUNCTUATION = r"\u3000-\u303f\uff00-\uffef"  # CJK symbols & punctuation, full-width forms
SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",                                        # contractions
    r"\p{Han}",                                                      # one Han character
    rf"[^\r\n\p{{L}}\p{{N}}\p{{Han}}{CJK_PUNCTUATION}]?[^\P{{L}}\p{{Han}}]+",  # (prefix) letters
    r"[^\P{N}\p{Han}]{1,3}",                                         # 1-3 digits
    r" ?[^\s\p{L}\p{N}\p{Han}]+[\r\n]*",                             # punctuation, symbols
    r"\s*[\r\n]",                                                    # newlines (+ spaces before)
    r"\s+(?!\S)",                                                    # spaces not before a word
    r"\s+",                                                          # any other whitespace
])

N_BYTES = 256  # ids 0..255 are the raw bytes


def pairs_of(ids: list[int]):
    """Adjacent pairs of a token list: [a, b, c] -> (a, b), (b, c)."""
    return zip(ids, ids[1:])


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    [1, 2, 3, 1, 2] with (1, 2) -> 9 gives [9, 3, 9]; for overlaps the leftmost wins:
    [7, 7, 7] with (7, 7) -> 9 gives [9, 7].
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def count_chunks(texts: Iterable[str], pattern: str = SPLIT_PATTERN) -> Counter:
    """Pre-tokenize a stream of texts into {chunk: how often it occurs}.

    BPE only needs each distinct chunk once with its count: 5 MB of text has
    about a million chunks but only tens of thousands of distinct ones, so all
    later work is on the distinct ones. Texts are consumed one at a time.
    """
    compiled = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


# ---------------------------------------------------------------------------
# 2. The trainer
# ---------------------------------------------------------------------------
# A naive trainer recounts all pairs in the whole corpus after every merge:
# 8,000 merges x 1 million chunks is far too slow. Two observations fix it:
#   - a merge of (a, b) only changes the chunks that contain (a, b), so we keep,
#     for each pair, the set of chunks it occurs in and update just those;
#   - to find the most frequent pair quickly we keep a max-heap of
#     (-count, pair). Updating an entry inside a heap is awkward, so we never do:
#     stale entries stay in the heap and are checked when popped ("lazy
#     invalidation"). This works because an existing pair's count can only go
#     down (a merge eats some of its occurrences); only brand-new pairs, those
#     containing the new token, appear with fresh counts, and we push those.

def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
              n_special: int = 3, verbose: bool = False, progress: bool = True) -> list[tuple[int, int]]:
    """Learn BPE merges from `texts`; returns [(a, b), ...] where merge i makes token 256 + i.

    The vocabulary is 256 bytes + the merges + `n_special` special tokens (which
    take the last ids), so vocab_size - 256 - n_special merges are learned (fewer
    if the text runs out of pairs). Each step merges the most frequent adjacent
    pair; ties go to the smallest pair (a, b), so the result is deterministic.
    """
    n_merges = vocab_size - N_BYTES - n_special
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small: it must hold "
                         f"{N_BYTES} bytes + {n_special} special tokens")

    # Distinct chunks as lists of byte ids, and how often each occurs.
    chunk_counts = count_chunks(texts, pattern)
    chunks = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    if verbose:
        total = sum(freqs)
        print(f"bpe: {total:,} chunks, {len(chunks):,} distinct; learning {n_merges:,} merges")

    # pair -> total count (weighted by chunk frequency), pair -> chunks containing it
    pair_counts: dict[tuple[int, int], int] = {}
    pair_where: dict[tuple[int, int], set[int]] = {}
    for idx, (ids, freq) in enumerate(zip(chunks, freqs)):
        for pair in pairs_of(ids):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            pair_where.setdefault(pair, set()).add(idx)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)  # smallest (-count, pair) first = highest count, then smallest pair

    # The bytes each token stands for. tiktoken maps a byte string to ONE id, so a
    # pair that spells the bytes of an existing token ("ab"+"c" when "a"+"bc" is
    # already a token) is skipped. Since merges are replayed in the same order on
    # every chunk this should not happen (we have never seen it); the check is
    # cheap and keeps the vocabulary valid whatever the input.
    vocab = [bytes([i]) for i in range(N_BYTES)]
    known_bytes = set(vocab)
    skipped: set[tuple[int, int]] = set()

    merges: list[tuple[int, int]] = []
    bar = _progress_bar(n_merges, progress)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0 or pair in skipped:
            continue                                   # pair no longer exists, or is skipped
        if -neg_count != count:
            heapq.heappush(heap, (-count, pair))       # stale entry: re-file with the true count
            continue
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        if new_bytes in known_bytes:
            skipped.add(pair)                          # same bytes as an existing token
            continue

        new_id = N_BYTES + len(merges)
        merges.append(pair)
        vocab.append(new_bytes)
        known_bytes.add(new_bytes)

        # Re-tokenize only the chunks that contain the pair, and apply the
        # difference (pairs after minus pairs before) to the global counts.
        new_pairs = set()
        for idx in pair_where.pop(pair):
            before = chunks[idx]
            after = merge_pair(before, pair, new_id)
            chunks[idx] = after
            freq = freqs[idx]
            for p in pairs_of(before):
                pair_counts[p] -= freq
            for p in pairs_of(after):
                pair_counts[p] = pair_counts.get(p, 0) + freq
            before_set, after_set = set(pairs_of(before)), set(pairs_of(after))
            for p in before_set - after_set:
                if p != pair:
                    pair_where[p].discard(idx)
            for p in after_set - before_set:
                pair_where.setdefault(p, set()).add(idx)
                if new_id in p:
                    new_pairs.add(p)
        del pair_counts[pair]
        for p in new_pairs:                            # brand-new pairs enter the heap once
            heapq.heappush(heap, (-pair_counts[p], p))

        bar.update(1)
        if verbose and len(merges) % 1000 == 0:
            bar.write(f"bpe: merge {len(merges):,}: {vocab[pair[0]]!r} + {vocab[pair[1]]!r} "
                      f"-> {new_bytes!r} (count {count:,})")
    bar.close()
    if verbose:
        print(f"bpe: learned {len(merges):,} merges ({len(skipped)} pairs skipped as duplicate bytes)")
    if len(merges) < n_merges:
        print(f"bpe: the text ran out of pairs after {len(merges):,} of {n_merges:,} merges: "
              f"vocabulary is {N_BYTES + len(merges) + n_special:,} tokens, not {vocab_size:,}")
    return merges


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar over the merges (hidden when disabled)."""
    return tqdm(total=total, desc="bpe merges", unit="merge", disable=not enabled,
                mininterval=0.5, smoothing=0.1)


# ---------------------------------------------------------------------------
# 3. Encoding with the merges (the readable reference; tiktoken is the fast one)
# ---------------------------------------------------------------------------

def merges_to_vocab(merges: list[tuple[int, int]]) -> list[bytes]:
    """Token id -> the bytes it stands for: bytes 0..255, then token 256+i = bytes(a) + bytes(b)."""
    vocab = [bytes([i]) for i in range(N_BYTES)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    return vocab


def encode_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """BPE-encode one chunk: repeatedly merge the adjacent pair with the lowest rank.

    A token's rank is its id, i.e. when its merge was learned, so this replays
    the merges in training order. Pairs are looked up by their bytes (as
    tiktoken does); on a tie the leftmost pair merges first.
    """
    if chunk in ranks:
        return [ranks[chunk]]  # the whole chunk is one token (tiktoken's shortcut, kept for equality)
    parts = [bytes([b]) for b in chunk]
    while len(parts) > 1:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
        candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
        if not candidates:
            break                              # no adjacent pair is a token: done
        _, i = min(candidates)                 # lowest rank, then leftmost
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def encode_reference(text: str, merges: list[tuple[int, int]], pattern: str = SPLIT_PATTERN) -> list[int]:
    """Encode text to token ids in pure Python: split into chunks, BPE each chunk.

    Same result as the tiktoken-backed Tokenizer.encode_ordinary (tests check
    it), just slow: it is here to be read.
    """
    ranks = {token: rank for rank, token in enumerate(merges_to_vocab(merges))}
    ids = []
    for chunk in regex.findall(pattern, text):
        ids.extend(encode_chunk(chunk.encode("utf-8"), ranks))
    return ids
