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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA-architecture model + tokenizer saved as a local model directory."""
    from tiny import tiny_model

    d = tmp_path_factory.mktemp("tiny-llama")
    m = tiny_model("llama")
    m.hf.save_pretrained(d)
    m.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory) -> Path:
    """tests/tiny.py's small JSONL facts file (two relations)."""
    from tiny import write_facts_jsonl

    p = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    write_facts_jsonl(p)
    return p


@pytest.fixture(scope="session")
def localized(tmp_path_factory, tiny_dir, facts_file) -> Path:
    """A run directory with localization (IG, AMIG, 3 steps) but no consistency results.
    Shared: tests copy it before adding stages."""
    from knowloc.cli import main

    run = tmp_path_factory.mktemp("runs") / "localized"
    assert main(["-q", "localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig,amig", "--n-steps", "3", "--out", str(run)]) == 0
    return run


@pytest.fixture()
def run(localized, tmp_path) -> Path:
    """A fresh copy of ``localized`` with consistency results (every fact)."""
    import shutil

    from knowloc.cli import main

    out = tmp_path / "run"
    shutil.copytree(localized, out)
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    return out


def cli_error(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit 2, no traceback, exactly one
    ``knowloc: error:`` line and it is the last one. Returns that line."""
    from knowloc.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("knowloc: error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]
    return errors[0]
