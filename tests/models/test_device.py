"""bfloat16 on a CPU without bfloat16 kernels: detection, its override, and the one warning."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from tiny import tiny_model

from knowloc.models import cpu_has_bf16, load_model, wrap
from knowloc.models.device import BF16_ENV, warn_slow_bf16

CPU = torch.device("cpu")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "bfloat16" in r.getMessage()]


def test_the_override_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BF16_ENV, "0")
    assert cpu_has_bf16() is False
    monkeypatch.setenv(BF16_ENV, "1")
    assert cpu_has_bf16() is True
    monkeypatch.setenv(BF16_ENV, "maybe")  # anything else: the detection decides
    detected = cpu_has_bf16()
    monkeypatch.delenv(BF16_ENV)
    assert cpu_has_bf16() is detected


def test_a_cpu_limited_to_avx2_has_no_bfloat16_kernels() -> None:
    """oneDNN limited to AVX2 (what an AVX2-only CPU gives) takes no bfloat16 matmul: the
    detection says so, whatever this machine's own CPU has."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch without oneDNN")
    env = {k: v for k, v in os.environ.items() if k != BF16_ENV}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    code = "from knowloc.models import cpu_has_bf16; print(cpu_has_bf16())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_one_warning_without_bfloat16_kernels(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    m = tiny_model("llama")
    half = copy.deepcopy(m.hf).to(torch.bfloat16)
    monkeypatch.setenv(BF16_ENV, "0")
    with caplog.at_level(logging.WARNING):
        wrap(half, m.tokenizer, name="bf16")
    (line,) = _warnings(caplog)
    assert "no bfloat16" in line and "float32" in line and "slower" in line
    assert "times" in line and "\n" not in line
    caplog.clear()
    monkeypatch.setenv(BF16_ENV, "1")
    with caplog.at_level(logging.WARNING):
        wrap(copy.deepcopy(half), m.tokenizer, name="bf16")
    assert _warnings(caplog) == []


def test_load_model_warns_once_for_bfloat16_on_such_a_cpu(tiny_dir, monkeypatch, caplog):
    monkeypatch.setenv(BF16_ENV, "0")
    with caplog.at_level(logging.WARNING):
        m = load_model(str(tiny_dir), dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.checked
    assert len(_warnings(caplog)) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(str(tiny_dir), dtype="float32", check=False)
    assert _warnings(caplog) == []


@pytest.mark.parametrize(("dtype", "device", "has", "warns"), [
    (torch.bfloat16, CPU, "0", True),
    (torch.bfloat16, CPU, "1", False),
    (torch.float32, CPU, "0", False),
    (torch.float16, CPU, "0", False),
    (torch.bfloat16, torch.device("cuda"), "0", False),
])
def test_only_bfloat16_on_the_cpu_warns(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                        device: torch.device, has: str, warns: bool) -> None:
    monkeypatch.setenv(BF16_ENV, has)
    assert warn_slow_bf16(device, dtype) is warns


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_next_token_logits_of_bfloat16_in_float32_without_kernels(
        monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """Without bfloat16 kernels the unembedding of the forward path is a float32 product of
    the same bfloat16 values (equal to float64 to float32 rounding); with them it is the
    module's own bfloat16 product, unchanged."""
    from knowloc.models import forward

    monkeypatch.setattr(forward, "UNEMBED_BLOCK", 7)  # many blocks, a partial last one
    m = tiny_model(arch)
    half = wrap(copy.deepcopy(m.hf).to(torch.bfloat16), m.tokenizer, name="bf16", check=False)
    hidden = forward.last_hidden(half, [half.encode_prompt("the capital of france is")])
    W = half.unembedding_matrix()
    ref = forward.apply_softcap(hidden.double() @ W.double().t(), half.logit_softcap())
    monkeypatch.setenv(BF16_ENV, "1")
    native = forward.logits_from_hidden(half, hidden)
    plain = forward.apply_softcap(half.unembedding()(hidden).float(), half.logit_softcap())
    assert torch.equal(native, plain)
    monkeypatch.setenv(BF16_ENV, "0")
    f32 = forward.logits_from_hidden(half, hidden)
    assert f32.dtype == torch.float32 and f32.shape == native.shape
    err = float((f32.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-6
    assert err <= float((native.double() - ref).abs().max() / ref.abs().max())
