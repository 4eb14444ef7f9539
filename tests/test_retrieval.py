"""retrieval.py: chunking, BM25 (checked against its formula by hand), dense search, the prompt with sources."""
import math

import pytest
import torch

from data.facts import answer_is_right, generate_facts, write_documents
from model import GPT, ModelConfig
from retrieval import BM25, Index, chunk_text, embed, read_documents, with_sources
from tokenizer import Tokenizer


def words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_paragraphs_are_packed_up_to_the_limit_and_chunks_overlap():
    text = "\n\n".join([words(50, 0), words(50, 50), words(50, 100)])
    chunks = chunk_text(text, max_words=120, overlap=10)
    assert [len(c.split()) for c in chunks] == [100, 60]               # 50+50 fit; the third starts a new chunk
    assert chunks[1].split()[:10] == chunks[0].split()[-10:]           # ... with the last 10 words of the one before
    assert chunks[1].split()[10:] == words(50, 100).split()


def test_a_paragraph_longer_than_the_limit_is_cut_into_overlapping_windows():
    chunks = chunk_text(words(250), max_words=100, overlap=20)
    assert [c.split()[0] for c in chunks] == ["w0", "w80", "w160"] and all(len(c.split()) <= 100 for c in chunks)
    assert chunks[-1].split()[-1] == "w249"                            # nothing lost at the end
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("x", max_words=10, overlap=10)


def test_bm25_scores_follow_the_formula():
    texts = ["cat sat", "dog sat near dog mat sat", "bird", "the of"]    # "the", "of": stopwords, not counted
    bm25 = BM25(texts, k1=1.2, b=0.75)
    n, avgdl = 4, (2 + 6 + 1 + 0) / 4
    idf_dog = math.log(1 + (n - 1 + 0.5) / (1 + 0.5))
    idf_sat = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))
    norm = 1.2 * (1 - 0.75 + 0.75 * 6 / avgdl)
    expected = idf_dog * 2 * 2.2 / (2 + norm) + idf_sat * 2 * 2.2 / (2 + norm)
    assert bm25.scores("dog sat the")[1] == pytest.approx(expected)
    assert bm25.scores("bird")[:2] == [0, 0] and bm25.scores("bird")[2] > 0
    assert bm25.scores("the of") == [0, 0, 0, 0]
    assert idf_dog > idf_sat                                           # rarer words weigh more


def test_the_right_document_is_found_and_cited(tmp_path):
    documents, questions = generate_facts(n_countries=12, seed=1)
    index = Index.from_folder(write_documents(documents, tmp_path / "docs"))
    found = [index.search(q["question"], k=1)[0].chunk.source == q["source"] for q in questions]
    assert sum(found) / len(found) > 0.9                               # the made-up names are rare words
    hit = index.search(questions[0]["question"], k=1)
    prompt = with_sources(questions[0]["question"], hit)
    assert f"[{hit[0].chunk.cite}]" in prompt and questions[0]["answer"] in prompt and prompt.endswith(questions[0]["question"])
    assert index.search("zzzz qqqq", k=3) == []                        # nothing shares a word: nothing is made up


def test_facts_are_reproducible_and_not_overwritten(tmp_path):
    assert generate_facts(5, seed=3) == generate_facts(5, seed=3) != generate_facts(5, seed=4)
    documents, _ = generate_facts(3, seed=0)
    folder = write_documents(documents, tmp_path)
    name = next(iter(documents))
    (folder / name).write_text("my own notes", encoding="utf-8")
    with pytest.raises(ValueError, match="exists with other text"):
        write_documents(documents, folder)
    assert (folder / name).read_text(encoding="utf-8") == "my own notes"
    assert answer_is_right("It is QUELLIN, I think.", "Quellin") and not answer_is_right("Paris", "Quellin")


def test_bad_folders_and_files_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_documents(tmp_path / "missing")
    (tmp_path / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="no .txt or .md files"):
        read_documents(tmp_path)
    (tmp_path / "notes.txt").write_bytes(b"fine\nstill fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"notes.txt:3: not UTF-8 text \(byte 0xff\)"):
        read_documents(tmp_path)


def test_dense_search_uses_the_models_embeddings():
    texts = [("a.txt", "apples and pears"), ("b.txt", "stone and river"), ("c.txt", "apples and pears")]
    tok = Tokenizer.from_texts(["apples and pears stone and river " * 20], vocab_size=280, progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    index = Index.from_texts(texts).add_dense(model, tok)
    assert index.vectors.shape == (3, 32) and torch.allclose(index.vectors.norm(dim=-1), torch.ones(3))
    hits = index.search("apples and pears", k=3, method="dense")
    assert {h.chunk.source for h in hits[:2]} == {"a.txt", "c.txt"}    # the same text embeds the same: cosine 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[2].chunk.source == "b.txt"
    with pytest.raises(ValueError, match="add_dense"):
        Index.from_texts(texts).search("x", method="dense")


def test_an_embedding_does_not_depend_on_the_padding_of_its_batch():
    tok = Tokenizer.from_texts(["apples and pears stone and river " * 20], vocab_size=280, progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    texts = ["apples", "stone and river and apples and pears"]
    assert len(tok.encode(texts[0])) < len(tok.encode(texts[1]))      # the short one is left-padded in the batch
    together = embed(texts, model, tok)
    alone = torch.cat([embed([t], model, tok) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_chinese_text_is_searched_character_by_character():
    index = Index.from_texts([("a.md", "佐比亚的首都是奎林。"), ("b.md", "面包是用面粉做的。")])
    [hit] = index.search("佐比亚的首都在哪里？", k=1)
    assert hit.chunk.source == "a.md"
