"""The default tiny-llama folder, resolved through the shared model cache ($FT_CACHE_DIR or ~/.cache/finetune).

The folder is digest-keyed and built atomically, so reuse is safe, and only a cold cache pays the ~3-9 s
tokenizer build (test_tiny checks its bytes). Tests must not modify it.
"""

import pytest

from finetune.models.cache import ModelUnavailable
from finetune.models.resolve import resolve_model
from finetune.models.tiny import TINY


def no_download(repo_id, cache):
    raise AssertionError("tests must never reach the network")


@pytest.fixture(scope="session")
def tiny():
    try:
        return resolve_model(TINY, downloader=no_download, log=lambda _m: None)
    except ModelUnavailable as exc:
        pytest.skip(f"tiny-llama needs SmolLM2's tokenizer: {exc}")
