"""Session fixtures for the data tests: a small text corpus and its built dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.helpers import SMALL_OPTIONS, build, write_text_corpus


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("text"), files=48, mean_bytes=12_000)


@pytest.fixture(scope="session")
def dataset(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The text corpus built once; tests that damage a dataset work on a copy."""
    out = tmp_path_factory.mktemp("dataset") / "shards"
    assert build([text_corpus], out, *SMALL_OPTIONS) == 0
    return out
