"""Real faults, tested for real: every training stage is killed with SIGKILL (`kill -9`) while it
runs as its own process, then continued as a user would, and must end exactly where an
uninterrupted run of the same flags ends, with every file in its folder loadable and no temp
file left behind.

    the fault (kill -9 ...)                           what the user does next
    pretrain, lora: while training                    python <stage>.py <same flags> --resume
    sft: after its last checkpoint, before            the same (nothing is left to train: the
         metrics.json                                 resumed run only measures and writes)
    dpo: before its first evaluation (no resume.pt)   the same command again, without --resume
    pretrain: in the middle of writing a checkpoint   python pretrain.py <same flags> --resume
    a 2-process torchrun job                          torchrun ... pretrain.py <same flags> --resume

Each moment is a seeded random one within its phase. A kill -9 cannot be caught: no `finally`,
no atexit, no flush runs; what survives is what was on disk, which is what these tests look at.
POSIX only (signals, process groups).
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dpo
import full_sft
import lora
import pretrain
from weight.checkpoint import load_adapted_model, load_checkpoint, load_checkpoint_tokenizer

from conftest import WORDS

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS, EVAL_INTERVAL = 8, 2
# one thread per stage process: the runs are tiny, and extra threads only fight over the CPU
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}   # unbuffered: see each line as it is printed
CHECKPOINT_FILES = ("model.pt", "config.json", "tokenizer.json", "resume.pt", "adapter.pt", "adapter_config.json")


@pytest.fixture(autouse=True)
def one_thread():
    """The uninterrupted runs in this process use one thread too, like the killed ones (and the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------
# A stage running as its own process, which the test can kill -9


class StageProcess:
    """`python <script> <flags>` (or torchrun) started in its own process group, its output read line by line.

    kill_when=(condition, delay): a watcher thread checks condition(self) every few milliseconds; once it
    holds, it waits `delay` seconds and sends SIGKILL to the process group."""

    def __init__(self, cmd, log: Path, kill_when=None):
        self.lines, self.killed, self.log = [], False, log
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     start_new_session=True)    # its own process group: kill it, never us
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if kill_when:
            threading.Thread(target=self._kill_when, args=kill_when, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:         # ends when every process holding the pipe has exited
            self.lines.append(line)

    def _kill_when(self, condition, delay):
        while self.proc.poll() is None:
            if condition(self):
                time.sleep(delay)
                self.kill()
                return
            time.sleep(0.002)

    def printed(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)

    def kill(self):
        """kill -9 of the whole process group (a stage, or torchrun's launcher: its workers have their own)."""
        self.killed = True
        self.send(signal.SIGKILL)

    def send(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:            # already gone
            pass

    def wait(self, timeout=300) -> int:
        """The exit status (-9 when the kill landed), once the output pipe has closed too."""
        try:
            rc = self.proc.wait(timeout=timeout)
            self.reader.join(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.stderr.close()
        assert not self.reader.is_alive(), f"a process of the run (a torchrun worker?) still runs {timeout} s later"
        return rc

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def stage_command(script, flags, processes=1):
    if processes == 1:
        return [sys.executable, str(ROOT / script), *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            str(ROOT / script), *flags]


def saved_step(out: Path):
    """The step of out/resume.pt, or None while there is none."""
    try:
        return torch.load(out / "resume.pt", map_location="cpu", weights_only=True)["state"]["step"]
    except FileNotFoundError:
        return None


def kill_moment(stage: str):
    """Each stage is killed in another phase of its run, at a seeded random moment within it.
    Returns (the moment in words, condition(run, out_dir), delay after the condition holds)."""
    rng = random.Random(f"kill -9 {stage}")
    if stage in ("pretrain", "lora"):     # training: shortly after a random evaluation (each writes resume.pt)
        step = rng.choice(range(EVAL_INTERVAL, MAX_STEPS, EVAL_INTERVAL))
        what, most = f"after the evaluation at step {step}", 0.2

        def condition(run, out):
            return run.printed(f"step {step}:")
    elif stage == "sft":                  # all steps done and saved; the accuracy and metrics.json not yet
        what, most = "after its last checkpoint", 0.1

        def condition(run, out):
            return saved_step(out) == MAX_STEPS
    else:                                 # dpo: still preparing (reference log-probs, optimizer): no resume.pt yet
        what, most = "before its first evaluation", 0.1

        def condition(run, out):
            return run.printed("before DPO:")
    delay = round(rng.uniform(0.0, most), 3)
    return f"{delay} s {what}", condition, delay


class KilledRun:
    """The stage started as its own process, to be killed -9 at its seeded moment. result() waits for it;
    if it finished before the kill landed, it runs it once more in a new folder, killed at the moment
    itself (no delay: then it cannot finish first). Returns the folder and the moment that landed."""

    def __init__(self, stage: str, chat, tmp_path: Path):
        self.stage, self.chat, self.tmp_path = stage, chat, tmp_path
        self.moment, self.condition, self.delay = kill_moment(stage)
        self.attempt = 0
        self._start()

    def _start(self):
        out = self.out = self.tmp_path / f"killed{self.attempt}"
        command = stage_command(STAGES[self.stage][0], stage_flags(self.stage, self.chat, out))
        self.run = StageProcess(command, self.tmp_path / f"killed{self.attempt}.log",
                                (lambda run: self.condition(run, out), self.delay))

    def result(self):
        rc = self.run.wait()
        if rc == -signal.SIGKILL:
            # metrics.json is written last: it may be there only beside a finished run
            assert not (self.out / "metrics.json").exists() or saved_step(self.out) == MAX_STEPS
            return self.out, self.moment
        assert rc == 0 and self.attempt == 0, f"kill -9 {self.moment}: exit status {rc}\n{self.run.tail()}"
        self.attempt, self.delay, self.moment = 1, 0.0, "0 s " + self.moment.split(" s ", 1)[1]
        self._start()
        return self.result()


def continue_as_a_user_would(main, flags, out: Path):
    """--resume when the killed run left a resumable state, else the same command again (a fresh start)."""
    resumable = (out / "resume.pt").exists()
    main([*flags, "--resume"] if resumable else flags)
    return resumable


# ----------------------------------------------------------------------------------
# What must hold after the resumed run


def assert_every_file_loads(out: Path, adapter=False):
    """No temp file left; every file in the folder parses; the weights load as a user loads them."""
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], f"temp files left behind: {names}"
    for path in out.iterdir():
        if path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                assert all(row["step"].isdigit() for row in csv.DictReader(f)), f"{path.name}: a torn row"
        elif path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a whole PNG"
        else:
            raise AssertionError(f"unexpected file {path.name} in {out}")
    if adapter:
        load_adapted_model(out)
    else:
        load_checkpoint(out)
        load_checkpoint_tokenizer(out)


def train_rows(out: Path) -> list[tuple[int, float]]:
    """log.csv's training-loss rows: (step, loss), one per step with --log_interval 1."""
    with open(out / "log.csv", newline="") as f:
        return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f) if r["train_loss"]]


def assert_same_as_uninterrupted(resumed: Path, straight: Path, weights="model.pt", keys=("val_loss",)):
    """What test_training's kill-and-resume test asserts (same final metrics and weights), plus: the
    same final step, and no step lost or repeated (log.csv has each step's training loss exactly once)."""
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert b["steps"] == a["steps"] == MAX_STEPS
    for key in keys:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    wa, wb = (torch.load(d / weights, weights_only=True) for d in (straight, resumed))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    rows_a, rows_b = train_rows(straight), train_rows(resumed)
    assert [s for s, _ in rows_b] == list(range(1, MAX_STEPS + 1)), "a step is lost or repeated in log.csv"
    assert [loss for _, loss in rows_b] == pytest.approx([loss for _, loss in rows_a], abs=1e-5)
    assert torch.load(resumed / "resume.pt", weights_only=True)["state"]["step"] == MAX_STEPS


# ----------------------------------------------------------------------------------
# The stages and their tiny flags


@pytest.fixture(scope="module")
def chat(tiny_pretrained, tmp_path_factory):
    """The tiny pretrained checkpoint, its corpus and chat data (conftest), plus preference pairs for DPO."""
    from data.chat_data import plausible_wrong_answer, preference_pair, read_conversations, synthetic_names, write_jsonl
    rng = random.Random(0)
    pairs = [preference_pair(r, w) for r in read_conversations(tiny_pretrained / "train.jsonl")
             if (w := plausible_wrong_answer(r, rng, WORDS, synthetic_names()))]
    pairs_file = tmp_path_factory.mktemp("faults") / "pairs.jsonl"
    write_jsonl(pairs_file, pairs[:60])
    return SimpleNamespace(folder=tiny_pretrained, pairs=pairs_file)


def stage_flags(stage: str, chat, out: Path) -> list[str]:
    """Tiny runs of MAX_STEPS steps, evaluating (and saving resume.pt) every EVAL_INTERVAL steps, on the CPU."""
    common = ["--out_dir", str(out), "--max_steps", str(MAX_STEPS), "--eval_interval", str(EVAL_INTERVAL),
              "--log_interval", "1", "--batch_size", "4", "--time_budget", "0", "--device", "cpu",
              "--dtype", "float32"]
    folder = chat.folder
    if stage == "pretrain":      # the tiny corpus, tokenizer and token cache of the tiny_pretrained fixture
        return common + ["--data", str(folder / "text.txt"), "--tokenizer", str(folder / "tok.json"),
                         "--cache_dir", str(folder / "cache"), "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
                         "--block_size", "32", "--eval_tokens", "256", "--warmup_steps", "2", "--sample_tokens", "0",
                         "--optimizer", "adamw", "--dropout", "0.1"]   # dropout: the RNG must resume too
    chat_flags = ["--init_from", str(folder / "ckpt"), "--max_new_tokens", "2", "--warmup_steps", "2"]
    if stage == "sft":
        return common + chat_flags + ["--data", str(folder / "train.jsonl"), "--eval_data",
                                      str(folder / "eval.jsonl"), "--optimizer", "adamw"]
    if stage == "lora":
        return common + chat_flags + ["--data", str(folder / "train.jsonl"), "--eval_data",
                                      str(folder / "eval.jsonl"), "--replay", "0", "--old_eval_data",
                                      str(folder / "eval.jsonl"), "--rank", "4"]
    return common + chat_flags + ["--data", str(chat.pairs), "--task_data", str(folder / "eval.jsonl")]


STAGES = {  # stage: (script, main, its weights file, metrics that must match an uninterrupted run)
    "pretrain": ("pretrain.py", pretrain.main, "model.pt", ("val_loss", "val_bpb")),
    "sft": ("full_sft.py", full_sft.main, "model.pt", ("val_loss", "accuracy")),
    "lora": ("lora.py", lora.main, "adapter.pt", ("new_skill_accuracy", "old_skills_accuracy")),
    "dpo": ("dpo.py", dpo.main, "model.pt", ("val_loss", "preference_accuracy", "reward_margin")),
}


# ----------------------------------------------------------------------------------
# The faults


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_result(stage, chat, tmp_path):
    """Fault: the stage's process gets SIGKILL (the out-of-memory killer, `kill -9`, a job scheduler) at a
    seeded random moment (kill_moment: pretrain and lora while training, sft after its last checkpoint but
    before metrics.json, dpo before its first evaluation). The user then runs the same command with --resume
    (or afresh, when no resume.pt was written yet) and gets what an uninterrupted run gives."""
    _, main, weights, keys = STAGES[stage]
    straight = tmp_path / "straight"
    killed_run = KilledRun(stage, chat, tmp_path)      # the stage as its own process, to be killed at its moment
    main(stage_flags(stage, chat, straight))           # meanwhile, in this process: the same flags, uninterrupted
    killed, moment = killed_run.result()
    left = sorted(p.name for p in killed.iterdir())
    resumed = continue_as_a_user_would(main, stage_flags(stage, chat, killed), killed)
    assert_every_file_loads(killed, adapter=stage == "lora")
    assert_same_as_uninterrupted(killed, straight, weights, keys)
    print(f"{stage}: kill -9 {moment} left {left}; then "          # shown when the test fails
          + ("--resume" if resumed else "a fresh start (no resume.pt yet)"))


def checkpoint_temps(out: Path) -> list[str]:
    """Temp files of checkpoint files in out: a write in progress (or cut off)."""
    try:
        return [n for n in os.listdir(out) if n.endswith(".tmp") and n.startswith(CHECKPOINT_FILES)]
    except FileNotFoundError:
        return []


def test_kill_9_in_the_middle_of_writing_a_checkpoint_then_resume(chat, tmp_path):
    """Fault: SIGKILL while a checkpoint file (model.pt, config.json, tokenizer.json, resume.pt) is being written.
    The test polls the folder for the temp file of one, freezes the process (SIGSTOP), and if the temp file is
    still there, the process is frozen mid-write: it is killed -9 then. The previous complete files must be
    intact beside the cut-off temp file; the resumed run must end as an uninterrupted one, leaving no temp file."""
    after = random.Random("kill -9 mid-write").randint(1, MAX_STEPS - 2)   # watch from a seeded random step on
    caught = []
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        flags = stage_flags("pretrain", chat, out) + ["--eval_interval", "1"]    # a checkpoint every step
        run = StageProcess(stage_command("pretrain.py", flags), tmp_path / f"killed{attempt}.log")
        while not run.printed(f"step {after}:") and run.proc.poll() is None:
            time.sleep(0.005)
        while run.proc.poll() is None:                           # then watch the folder closely
            if checkpoint_temps(out):
                run.send(signal.SIGSTOP)                         # freeze it ...
                if checkpoint_temps(out):
                    run.kill()                                   # ... mid-write: kill -9
                    break
                run.send(signal.SIGCONT)                         # the write had just ended: go on
        rc = run.wait()
        caught = checkpoint_temps(out)
        if caught:
            assert rc == -signal.SIGKILL
            break
        assert rc in (0, -signal.SIGKILL), run.tail()           # finished, or killed just after a rename: again
    assert caught, "never caught a checkpoint write in 3 runs"
    for name in ("model.pt", "resume.pt"):         # beside the cut-off temp file: the previous complete files
        if (out / name).exists():
            torch.load(out / name, weights_only=True)
    left = sorted(p.name for p in out.iterdir())
    resumed = continue_as_a_user_would(pretrain.main, flags, out)
    straight = tmp_path / "straight"
    pretrain.main(stage_flags("pretrain", chat, straight) + ["--eval_interval", "1"])
    assert_every_file_loads(out)
    assert_same_as_uninterrupted(out, straight, keys=("val_loss", "val_bpb"))
    print(f"pretrain: kill -9 while writing {caught} (watched from step {after} on) left {left}; then "
          + ("--resume" if resumed else "a fresh start (no resume.pt yet)"))


def test_kill_9_of_a_torchrun_job_then_resume_with_torchrun(chat, tmp_path):
    """Fault: SIGKILL to the process group of a 2-process torchrun job (gloo on the CPU), right after its
    evaluation at step 2. torchrun starts its workers in sessions of their own, so the kill reaches only the
    launcher: the workers must notice that it is gone and stop (not train on unseen, writing into the folder
    the user's next run uses). Then the user runs torchrun again with --resume: it ends at the final step,
    every step counted once, every file loadable."""
    out = tmp_path / "ddp"
    flags = stage_flags("pretrain", chat, out)
    job = StageProcess(stage_command("pretrain.py", flags, processes=2), tmp_path / "ddp.log",
                       (lambda run: run.printed("step 2:"), 0.0))
    try:
        rc = job.wait(timeout=120)     # the launcher's status, once every worker has closed the output pipe too
    finally:
        for pid in workers_left(job, out):      # the workers outlived the test's patience: clean up
            os.kill(pid, signal.SIGKILL)
    assert job.killed and rc == -signal.SIGKILL, job.tail()
    assert not (out / "metrics.json").exists(), "the workers went on and finished the run after torchrun was killed"
    assert "the torchrun that started this process is gone" in job.log.read_text()
    steps_done = saved_step(out)
    assert steps_done is not None and steps_done < MAX_STEPS

    resumed = subprocess.run(stage_command("pretrain.py", [*flags, "--resume"], processes=2), cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'resume.pt'} at step {steps_done}" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and metrics["world_size"] == 2 and saved_step(out) == MAX_STEPS
    assert metrics["tokens"] == 2 * MAX_STEPS * 4 * 32       # every step counted once, for both processes
    assert [s for s, _ in train_rows(out)] == list(range(1, MAX_STEPS + 1)), "a step is lost or repeated"
    assert_every_file_loads(out)


def test_ctrl_c_of_a_multi_process_run_ends_in_one_line_then_resumes(chat, tmp_path):
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) of `python pretrain.py --nproc 2`
    after step 2: the processes stop, exit 130, one line says how to go on, and no traceback (torchrun's
    launcher prints one of its own; the stage's --nproc runs the same launcher without it). A failing
    process also ends in one line. Then --nproc 2 --resume finishes the run."""
    out = tmp_path / "ddp"
    flags = stage_flags("pretrain", chat, out)
    job = StageProcess([sys.executable, str(ROOT / "pretrain.py"), *flags, "--nproc", "2"], tmp_path / "ddp.log")
    deadline = time.monotonic() + 120
    while not job.printed("step 2:") and job.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send(signal.SIGINT)
    try:
        rc = job.wait(timeout=120)
    finally:
        for pid in workers_left(job, out):
            os.kill(pid, signal.SIGKILL)
    stderr = job.log.read_text()
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("interrupted; rerun with --resume") == 1, stderr[-3000:]
    assert not (out / "metrics.json").exists() and saved_step(out) is not None

    bad = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *flags, "--lr", "-1", "--nproc", "2"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "error: a process of 2 failed (exit 2)" in bad.stderr and "--lr" in bad.stderr

    resumed = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *flags, "--resume", "--nproc", "2"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2


def workers_left(job: StageProcess, out: Path) -> list[int]:
    """The job's processes still running after the wait (Linux /proc: command lines naming its --out_dir)."""
    if not job.reader.is_alive() or not Path("/proc").is_dir():
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(out).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:            # a process that ended meanwhile
            pass
    return pids
