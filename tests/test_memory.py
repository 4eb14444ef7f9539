"""memory.py and the REPL's long-term memory: SQLite turns, notes, persona; old turns recalled after a restart."""
import sqlite3

import pytest
import torch

from engine import Engine, SamplingParams
from inference import Session
from memory import Memory, system_with_memories
from model import GPT, ModelConfig
from tokenizer import Tokenizer

FILLER = ["Tell me about the weather on day {}.", "What should I cook on day {}?", "Which book fits day {}?"]


@pytest.fixture(scope="module")
def engine():
    tok = Tokenizer.from_texts(["My cat is called Miso. " + " ".join(FILLER) * 20], vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32))
    return Engine(model, tok, chat=True)


def test_turns_notes_and_persona_survive_a_new_connection(tmp_path):
    db = tmp_path / "me.db"
    memory = Memory(db)
    memory.add_turn("user", "hello")
    memory.add_turn("assistant", "hi")
    memory.remember("I prefer short answers")
    memory.persona = "You are Pip, a cheerful tutor."
    memory.persona = "You are Pip, a patient tutor."                 # replaced, not added
    memory.close()
    again = Memory(db)
    assert [(r, c) for _, r, c in again.turns()] == [("user", "hello"), ("assistant", "hi")]
    assert [t for _, t in again.notes()] == ["I prefer short answers"]
    assert again.persona == "You are Pip, a patient tutor."
    assert again.forget("SHORT") == 1 and again.notes() == []
    assert again.forget("all") == 2 and again.turns() == []


def test_recall_ranks_by_relevance_and_skips_what_the_prompt_holds():
    memory = Memory(":memory:")
    cat = memory.add_turn("user", "My cat is called Miso.")
    memory.add_turn("user", "The weather is nice today.")
    memory.remember("The user's sister lives in Lyon.")
    assert [r.text for r in memory.recall("what is my cat called?", k=1)] == ["user: My cat is called Miso."]
    assert [r.kind for r in memory.recall("where does my sister live?", k=1)] == ["note"]
    assert all(r.id != cat or r.kind != "turn" for r in memory.recall("cat", exclude_ids=[cat]))
    assert memory.recall("zebra") == []                               # nothing in common: nothing recalled
    system = system_with_memories("Be brief.", memory.recall("cat"))
    assert system == "Be brief.\n\nThings you remember from earlier conversations:\n- user: My cat is called Miso."
    assert system_with_memories("Be brief.", []) == "Be brief."


def test_a_file_that_is_not_a_database_is_one_clear_line(tmp_path):
    (tmp_path / "notes.db").write_text("just text, not SQLite" * 100)
    with pytest.raises(ValueError, match="not a memory database"):
        Memory(tmp_path / "notes.db")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Memory(tmp_path / "no" / "such" / "me.db")
    with pytest.raises(ValueError, match="/remember needs the text"):
        Memory(":memory:").remember("  ")


def test_a_fact_told_more_than_a_context_ago_is_recalled_after_a_restart(engine, tmp_path, capsys):
    db = tmp_path / "me.db"
    params = SamplingParams.greedy(4)
    first = Session(engine, params, system="You are Pip.", memory=Memory(db))
    first.answer("My cat is called Miso.")
    for day in range(30):
        first.answer(FILLER[day % 3].format(day))
    later = [len(engine.tokenizer.encode(c)) for _, _, c in Memory(db).turns()[2:]]
    assert sum(later) > engine.context                              # the fact is more than a context window back
    assert all("Miso" not in m["content"] for m in first.history)     # ... and the live history dropped it

    restarted = Session(engine, params, memory=Memory(db))           # a new session on the same file
    assert restarted.system == "You are Pip."                          # the persona came back
    prompt = engine.tokenizer.decode(restarted.conversation_ids("What is my cat called?"))
    assert "user: My cat is called Miso." in prompt and "Things you remember" in prompt
    assert all("Miso" not in m["content"] for m in restarted.history)  # it came from recall, not the window

    forgetful = Session(engine, params, system="You are Pip.")
    forgetful.history = list(restarted.history)
    assert "Miso" not in engine.tokenizer.decode(forgetful.conversation_ids("What is my cat called?"))


def test_remember_and_forget_in_the_repl(engine, tmp_path, capsys):
    session = Session(engine, SamplingParams.greedy(2), memory=Memory(tmp_path / "m.db"))
    session.command("/remember My sister lives in Lyon.")
    session.command("/remember")
    assert "1. My sister lives in Lyon." in capsys.readouterr().out
    prompt = engine.tokenizer.decode(session.conversation_ids("Where does my sister live?"))
    assert "- My sister lives in Lyon." in prompt
    session.command("/forget lyon")
    assert "forgot 1 record" in capsys.readouterr().out
    assert "Lyon" not in engine.tokenizer.decode(session.conversation_ids("Where does my sister live?"))
    plain = Session(engine, SamplingParams.greedy(2))
    plain.command("/remember x")
    assert "start with --memory" in capsys.readouterr().out
    assert sqlite3.connect(tmp_path / "m.db").execute("SELECT count(*) FROM notes").fetchone() == (0,)
