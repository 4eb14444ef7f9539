"""
retrieval.py -- find the passages of your documents that answer a question, and put them in the prompt.

    index = Index.from_folder("notes/")              # every .txt and .md file, cut into chunks
    for hit in index.search("capital of Zorbia", k=3):
        print(hit.score, hit.chunk.cite, hit.chunk.text)   # 7.1 zorbia.md#0 The capital of Zorbia is ...
    prompt = with_sources("What is the capital of Zorbia?", index.search(...))

    python inference.py --ckpt smollm2 --docs notes/   # every question answered with the passages found
    python serve.py --ckpt smollm2 --docs notes/       # the same behind the API

A model knows only what it was trained on; retrieval-augmented generation (RAG) hands it the
relevant text at answer time instead. Three steps, each a small function here:

1. chunking: a file is split into paragraphs, and paragraphs are packed into chunks of at
   most `max_words` words; each chunk starts with the tail (up to `overlap` words) of the one
   before, so a fact that straddles a boundary is whole in one of them.
2. scoring: BM25 (below), the classic word-matching score search engines used for decades;
   optionally dense retrieval: the model's own hidden states, mean-pooled, compared by cosine.
3. prompting: the best k chunks go before the question, each with its source [file#chunk],
   and the model is asked to answer from them and cite the source.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DOC_SUFFIXES = (".txt", ".md")
TERM = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")     # words; every Chinese character a term of its own
# words so common that they only add noise: in a small collection (a few notes) idf cannot tell
# that "my" matters less than "sister"
STOPWORDS = frozenset("a an the is are was were be been of in on at to for and or but not it its this that "
                      "with by as from my your i you me we he she they what which who whom where when how "
                      "do does did can could would should will".split())


# ----------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True)
class Chunk:
    source: str        # the file, relative to the folder indexed
    number: int        # its place in the file: 0, 1, ...
    text: str

    @property
    def cite(self) -> str:
        return f"{self.source}#{self.number}"


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs: text between blank lines, with their inner whitespace collapsed."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def chunk_text(text: str, max_words: int = 120, overlap: int = 20) -> list[str]:
    """Paragraphs packed into chunks of at most max_words words; every chunk after the first
    starts with the last `overlap` words of the one before. A paragraph longer than max_words
    is cut into windows of max_words words, stepping max_words - overlap."""
    if not 0 <= overlap < max_words:
        raise ValueError(f"overlap must be in [0, max_words), got overlap {overlap}, max_words {max_words}")
    pieces = []                                       # paragraphs, long ones cut into windows
    for paragraph in split_paragraphs(text):
        words = paragraph.split()
        step = max_words - overlap
        pieces += [words[i:i + max_words] for i in range(0, max(len(words) - overlap, 1), step)] \
            if len(words) > max_words else [words]
    chunks, current = [], []
    for words in pieces:
        if current and len(current) + len(words) > max_words:
            chunks.append(current)
            carried = current[-overlap:] if overlap else []
            current = carried if len(carried) + len(words) <= max_words else []
        current = current + words
    if current:
        chunks.append(current)
    return [" ".join(words) for words in chunks]


def read_documents(folder: str | Path) -> list[tuple[str, str]]:
    """(relative path, text) of every .txt/.md file under folder, in name order; one clear line
    for a folder that is missing or has no documents, or a file that is not UTF-8 text."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--docs {folder}: no such folder: give a folder of .txt or .md files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in DOC_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"--docs {folder}: no .txt or .md files in it")
    documents = []
    for path in files:
        try:
            documents.append((path.relative_to(folder).as_posix(), path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}): "
                             f"save it as UTF-8 or move it out of the folder") from None
    return documents


# ----------------------------------------------------------------------------------
# BM25


def terms(text: str) -> list[str]:
    """Lower-cased words (less the STOPWORDS) and single Chinese characters: what BM25 counts."""
    return [t for t in TERM.findall(text.lower()) if t not in STOPWORDS]


class BM25:
    """Okapi BM25 over a list of texts.

        score(q, d) = sum over terms t of q:  idf(t) * f(t, d) * (k1 + 1) / (f(t, d) + k1 * (1 - b + b * |d| / avgdl))
        idf(t)      = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

    f(t, d): how often t occurs in d; |d|: d's length in terms; avgdl: the average length;
    N: the number of texts; n(t): how many contain t. idf makes rare words count more (this
    form, Lucene's, is never negative); k1 makes repeats saturate (the 10th "Zorbia" adds
    little); b says how much a long text is discounted for having more words to match by chance.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.counts = [Counter(terms(t)) for t in texts]                 # f(t, d) per text
        self.lengths = [sum(c.values()) for c in self.counts]
        self.avgdl = sum(self.lengths) / max(len(texts), 1) or 1.0
        having = Counter(t for c in self.counts for t in c)               # n(t)
        n = len(texts)
        self.idf = {t: math.log(1 + (n - n_t + 0.5) / (n_t + 0.5)) for t, n_t in having.items()}

    def scores(self, query: str) -> list[float]:
        """One score per text (0 where no query term occurs)."""
        query_terms = terms(query)
        out = []
        for count, length in zip(self.counts, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avgdl)
            out.append(sum(self.idf[t] * count[t] * (self.k1 + 1) / (count[t] + norm)
                           for t in query_terms if t in count))
        return out


# ----------------------------------------------------------------------------------
# Dense retrieval: the model's own embeddings


def embed(texts: Sequence[str], model, tokenizer, batch_size: int = 16, max_tokens: int = 256):
    """Texts -> unit vectors (N, C): the model's last hidden states (after its final norm),
    averaged over each text's tokens. A model trained only to predict the next token was never
    taught to make these similar for a question and its answer: a baseline to compare with BM25.
    (torch is imported here, not at the top: BM25 alone, e.g. in mcp_server.py, starts faster without it.)"""
    import torch
    if getattr(model.config, "n_encoder_layer", 0):
        raise ValueError("dense retrieval needs a decoder-only model (an encoder-decoder has no final_norm hook here)")
    captured = []
    hook = model.final_norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
    device = next(model.parameters()).device
    vectors = []
    try:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer.encode_ordinary(t)[:min(max_tokens, model.config.block_size)] or [tokenizer.eot_id]
                   for t in texts[start:start + batch_size]]
            longest = max(len(i) for i in ids)
            pad = torch.tensor([longest - len(i) for i in ids], device=device)               # (B,)
            idx = torch.tensor([[tokenizer.eot_id] * (longest - len(i)) + i for i in ids], device=device)
            captured.clear()
            with torch.no_grad():
                model(idx, pad_lengths=pad if bool(pad.any()) else None)
            hidden = captured[-1].float()                                                   # (B, T, C)
            real = (torch.arange(longest, device=device)[None, :] >= pad[:, None]).float()  # (B, T) 1 = a real token
            mean = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)           # (B, C)
            vectors.append(torch.nn.functional.normalize(mean, dim=-1))
    finally:
        hook.remove()
    return torch.cat(vectors)


# ----------------------------------------------------------------------------------
# The index


@dataclass
class Hit:
    chunk: Chunk
    score: float


class Index:
    """Chunks of documents, searchable by BM25 and, once `add_dense` has run, by embeddings."""

    def __init__(self, chunks: Sequence[Chunk], k1: float = 1.5, b: float = 0.75):
        if not chunks:
            raise ValueError("nothing to index: the documents have no text")
        self.chunks = list(chunks)
        self.bm25 = BM25([c.text for c in self.chunks], k1, b)
        self.vectors = None                  # (N, C) after add_dense
        self.model = self.tokenizer = None

    @classmethod
    def from_texts(cls, documents: Sequence[tuple[str, str]], max_words: int = 120, overlap: int = 20) -> "Index":
        """documents: (source name, text) pairs."""
        return cls([Chunk(source, i, piece) for source, text in documents
                    for i, piece in enumerate(chunk_text(text, max_words, overlap))])

    @classmethod
    def from_folder(cls, folder: str | Path, max_words: int = 120, overlap: int = 20) -> "Index":
        return cls.from_texts(read_documents(folder), max_words, overlap)

    def add_dense(self, model, tokenizer) -> "Index":
        """Embed every chunk with the model, for search(..., method="dense")."""
        self.model, self.tokenizer = model, tokenizer
        self.vectors = embed([c.text for c in self.chunks], model, tokenizer)
        return self

    def search(self, query: str, k: int = 3, method: str = "bm25") -> list[Hit]:
        """The k best chunks for the query, best first. BM25 returns only chunks sharing a term
        with the query (fewer than k if fewer match); dense always returns k."""
        if method == "bm25":
            scores = self.bm25.scores(query)
        elif method == "dense":
            if self.vectors is None:
                raise ValueError("dense search needs the chunks embedded first: index.add_dense(model, tokenizer)")
            scores = (self.vectors @ embed([query], self.model, self.tokenizer)[0]).tolist()   # cosine (N,)
        else:
            raise ValueError(f"unknown search method {method!r}: bm25 or dense")
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [Hit(self.chunks[i], scores[i]) for i in order[:k] if method == "dense" or scores[i] > 0]

    def __len__(self) -> int:
        return len(self.chunks)


def with_sources(question: str, hits: Sequence[Hit]) -> str:
    """The user's message as the model sees it: the passages found, each with its source, then the
    question. (The conversation's history keeps the plain question.)"""
    if not hits:
        return question
    passages = "\n".join(f"[{h.chunk.cite}] {h.chunk.text}" for h in hits)
    return (f"Answer using these passages, and cite the source in brackets.\n{passages}\n\n"
            f"Question: {question}")
