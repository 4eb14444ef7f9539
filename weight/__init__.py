"""weight/: checkpoints (git-ignored) and hf.py, which imports and exports Hugging Face model folders."""
