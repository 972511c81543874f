from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = HERE.parents[1] / "shared"
PARAREL = SHARED / "data" / "pararel"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"


@pytest.fixture(scope="session")
def gemma():
    from knowloc import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2():
    from knowloc import load_model

    return load_model("smollm2-135m")
