from pathlib import Path

import pytest

from tests.helpers.tiny_tokenizer import train_tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A folder with only a trained tokenizer, per style."""
    dirs = {}
    for style in ("llama3", "chatml"):
        dirs[style] = tmp_path_factory.mktemp(style)
        train_tiny_tokenizer(dirs[style], style=style)
    return dirs
