"""Offline data: registry archives, tokenizers, the real-text corpus, loaders and long-context tasks."""
