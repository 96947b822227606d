"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 chat tokenizer (offline; built once into the align cache, then loaded from it)."""
    import chatml

    return chatml.qwen_tokenizer()
