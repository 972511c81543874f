"""The loaded model: structure, tokenization and the self-check run at load time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DeviceError, ModelError, TokenizationError
from . import compat, forward
from .adapters import Adapter, find_adapter
from .forward import ActivationFn

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "TARGETS", "Model", "file_sha256", "load_model", "resolve_device",
           "resolve_dtype", "weight_files", "wrap"]

def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}; use cpu or cuda (e.g. cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was requested (--device cuda) but no CUDA device is available; "
            "use --device cpu"
        )
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {str(device)!r}; use cpu or cuda")
    return dev


#: What is attributed (and screened): ``"first"``, the answer's first token (extended
#: through a leading whitespace-only or partial-byte token, :meth:`Model.target_ids`), or
#: ``"all"``, the teacher-forced probability of the whole answer.
TARGETS = ("first", "all")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise DeviceError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass
class Model:
    """A loaded causal LM with its tokenizer and adapter."""

    hf: nn.Module
    tokenizer: Any
    adapter: Adapter
    name: str
    revision: str | None = None
    checked: bool = field(default=False)
    #: The files the weights were loaded from (:func:`load_model`); empty for a model built
    #: in memory, whose :meth:`weights_identity` hashes the state dict instead.
    weights_from: tuple[Path, ...] = ()
    _identity: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def weights_identity(self) -> dict[str, Any]:
        """What identifies the model's weights: ``sha256`` (one hex digest for all of them),
        ``source`` (``"files"`` or ``"state_dict"``), the ``files`` with their own sha256, the
        hub ``revision`` when known, and for an embedded model the ``gguf_sha256`` of the GGUF
        it was dequantized from.

        Loaded from files, ``sha256`` hashes the names and digests of the weight files
        (:func:`file_sha256`, cached by path, size and mtime, so a re-load costs nothing);
        built in memory, it hashes every state-dict tensor (name, dtype, shape, bytes).
        Computed on the first call and kept: ask before editing the weights in place.
        """
        if self._identity is None:
            ident: dict[str, Any] = {"revision": self.revision}
            if self.weights_from:
                files = {p.name: file_sha256(p) for p in self.weights_from}
                listing = "".join(f"{n}\t{h}\n" for n, h in sorted(files.items()))
                ident.update(source="files", files=files,
                             sha256=hashlib.sha256(listing.encode("utf-8")).hexdigest())
                from .. import embedded

                provenance = embedded.read_provenance(self.weights_from[0].parent)
                if provenance and provenance.get("gguf_sha256"):
                    ident["gguf_sha256"] = str(provenance["gguf_sha256"])
            else:
                ident.update(source="state_dict", sha256=_state_dict_sha256(self.hf))
            self._identity = ident
        return dict(self._identity)

    # ----------------------------------------------------------------- structure
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.config)

    @property
    def d_mlp(self) -> int:
        return self.adapter.d_mlp(self.config)

    @property
    def d_model(self) -> int:
        """Width of the residual stream (hidden size)."""
        return self.adapter.d_model(self.config)

    @property
    def n_heads(self) -> int:
        """Attention (query) heads per layer."""
        return self.adapter.n_heads(self.config)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than ``n_heads`` with grouped-query attention)."""
        return self.adapter.n_kv_heads(self.config)

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim(self.config)

    @property
    def context_length(self) -> int | None:
        """Maximum sequence length of the model (None when its config has none)."""
        return self.adapter.context_length(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def layers(self) -> Sequence[nn.Module]:
        return _get(self.hf, self.adapter.layers)

    def down_proj(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.adapter.down_proj)

    def attention(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.adapter.attention)

    def base_model(self) -> nn.Module:
        """The decoder stack without the unembedding; its output is the final-normed hidden state."""
        return _get(self.hf, self.adapter.base)

    def unembedding(self) -> nn.Module:
        """The output projection (``get_output_embeddings()``, else the adapter's path)."""
        head = self.hf.get_output_embeddings()  # type: ignore[operator]
        out = head if head is not None else _get(self.hf, self.adapter.unembedding)
        assert isinstance(out, nn.Module)
        return out

    def logit_softcap(self) -> float | None:
        """Final logit soft-capping (Gemma 2 style), or None."""
        return self.adapter.logit_softcap(self.config)

    def unembedding_matrix(self) -> torch.Tensor:
        """[vocab, d_model]: row v maps the final hidden state to logit v (E in METHODS §3)."""
        weight = self.unembedding().weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def value_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] view of the value vectors of ``layer`` (writes go to the weight)."""
        w = self.down_proj(layer).weight
        assert isinstance(w, torch.Tensor)
        return w if self.adapter.down_proj_conv1d else w.t()

    # ---------------------------------------------------------------- tokenizing
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, with the special tokens the tokenizer adds by default."""
        if not prompt or not prompt.strip():
            raise TokenizationError("empty prompt")
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) < 1:
            raise TokenizationError(f"prompt {prompt!r} tokenizes to nothing")
        return list(ids)

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Token ids of ``answer`` as it continues ``prompt`` (leading space, no specials).

        An answer that contains a special token (``<eos>``, ``<pad>``, ...) raises
        :class:`TokenizationError`: a special token is never an answer.
        """
        if not answer or not answer.strip():
            raise TokenizationError(f"empty answer for prompt {prompt!r}")
        answer = answer.strip()
        tok = self.tokenizer
        special = self.special_ids()
        named = [t for t in tok(" " + answer, add_special_tokens=False)["input_ids"] if t in special]
        if named:
            raise TokenizationError(
                f"answer {answer!r} contains the special token "
                f"{tok.convert_ids_to_tokens(named[0])!r}; an answer must be text"
            )
        full = tok(prompt + " " + answer)["input_ids"]
        head = tok(prompt)["input_ids"]
        if full[: len(head)] == head and len(full) > len(head):
            ids = list(full[len(head):])
        else:
            ids = list(tok(" " + answer, add_special_tokens=False)["input_ids"])
        ids = [i for i in ids if i not in special]
        if not ids:
            raise TokenizationError(
                f"answer {answer!r} tokenizes to nothing for prompt {prompt!r}"
            )
        return ids

    def target_ids(self, prompt: str, answer: str, target: str = "first") -> list[int]:
        """The answer tokens whose teacher-forced probability is attributed.

        ``target="all"``: every token of the answer. ``"first"``: the answer's first token
        -- extended through the following tokens when it names nothing by itself, i.e. the
        shortest prefix of the answer that decodes to a complete (no partial UTF-8 byte)
        text with a non-whitespace character. On most answers that is the first token; on
        Gemma, ``" 1961"`` starts with a bare space token and ``first`` is space + ``"1"``,
        so a target is never a whitespace-only token or a lone byte of an emoji.
        """
        if target not in TARGETS:
            raise ConfigError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
        ids = self.answer_ids(prompt, answer)
        if target == "all":
            return ids
        for k in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:k])
            if text.strip() and "\ufffd" not in text:
                return ids[:k]
        return ids

    def eos_id(self) -> int:
        tok = self.tokenizer
        for attr in ("eos_token_id", "pad_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
        v = self.adapter.eos_token_id(self.config)
        if v is None:
            raise ModelError("the tokenizer has no EOS or pad token (needed for baselines)")
        return int(v)

    def mask_id(self) -> int:
        """The token used to mask a word (SIG): mask, else pad, else EOS."""
        tok = self.tokenizer
        for attr in ("mask_token_id", "pad_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
        return self.eos_id()

    def special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    # ------------------------------------------------------------------- running
    def next_token_probs(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> torch.Tensor:
        """[n, vocab] next-token probabilities after each prompt (float32, one pass each;
        :func:`knowloc.models.forward.next_token_probs`)."""
        rows = []
        for p in prompts:
            ids = self.encode_prompt(p) if isinstance(p, str) else list(p)
            rows.append(forward.next_token_probs(self, [ids])[0])
        return torch.stack(rows)

    @contextlib.contextmanager
    def hook_activations(self, fn: ActivationFn,
                         layers: Sequence[int] | None = None) -> Iterator[None]:
        """Temporarily replace the down-projection input of ``layers`` by ``fn(layer, h)``.

        ``h`` is ``[batch, seq, d_mlp]``; ``fn`` returns the tensor to use instead. The hooks
        are removed on exit, also on error.
        """
        handles = []
        try:
            for layer in range(self.n_layers) if layers is None else layers:
                def pre(module: nn.Module, args: tuple[Any, ...], _l: int = layer) -> tuple[Any, ...]:
                    return (fn(_l, args[0]),) + tuple(args[1:])

                handles.append(self.down_proj(layer).register_forward_pre_hook(pre))
            yield
        finally:
            for h in handles:
                h.remove()

    def activations(self, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[n_layers, d_mlp] neuron activations at the last position of a prompt."""
        ids = torch.as_tensor(prompt_ids, device=self.device).reshape(1, -1)
        return forward.last_activations(self, ids)[0]

    # ----------------------------------------------------------------- self-check
    @torch.no_grad()
    def _check_mlp_structure(self, ids: torch.Tensor) -> None:
        """The hooked module must be the MLP's last operation: its output is the MLP block's
        output, and its input width is d_mlp. (Zeroing an input of *any* linear layer equals
        zeroing the matching weight column, so that check alone cannot catch a wrong site.)"""
        parent_path = self.adapter.mlp
        for layer in (0, self.n_layers - 1):
            block = self.layers()[layer]
            mlp = _get(block, parent_path)
            proj = self.down_proj(layer)
            if not any(m is proj for m in mlp.modules()):
                raise ModelError(
                    f"adapter {self.adapter.name!r} self-check failed: {self.adapter.down_proj!r} "
                    f"is not inside the MLP block {parent_path!r}"
                )
            seen: dict[str, torch.Tensor] = {}
            h1 = mlp.register_forward_hook(lambda m, a, o, s=seen: s.__setitem__("mlp", o))
            h2 = proj.register_forward_hook(lambda m, a, o, s=seen: s.__setitem__("proj", o))
            try:
                forward.last_hidden(self, ids)
            finally:
                h1.remove()
                h2.remove()
            mlp_out = seen.get("mlp")
            mlp_out = mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out
            width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
            if (
                "proj" not in seen
                or mlp_out is None
                or mlp_out.shape != seen["proj"].shape
                or not torch.equal(mlp_out, seen["proj"])
                or (width is not None and int(width) != self.d_mlp)
            ):
                raise ModelError(
                    f"adapter {self.adapter.name!r} self-check failed: {self.adapter.down_proj!r} "
                    f"of layer {layer} is not the last operation of its MLP block "
                    f"({parent_path or 'layer'}) with {self.d_mlp} inputs; the hooked module is "
                    "not the down projection"
                )

    @torch.no_grad()
    def self_check(self, atol: float = 1e-4) -> None:
        """Verify the adapter: hook shape, and activation-zeroing == value-vector-zeroing."""
        ids = torch.tensor([self.encode_prompt("The capital of France is")], device=self.device)
        seen: dict[int, tuple[int, ...]] = {}

        def shape(layer, h):
            seen[layer] = tuple(h.shape)
            return h

        base = forward.next_token_logits(self, ids, act_fn=shape)[0]
        if not bool(torch.isfinite(base).all()):
            dtype = str(self.dtype).removeprefix("torch.")
            raise ModelError(
                f"{self.name} does not run in {dtype}: its activations exceed {dtype}'s range "
                "and become inf/nan; use --dtype bfloat16 (float32's range) or float32")
        expect = (1, ids.shape[1], self.d_mlp)
        bad = {k: v for k, v in seen.items() if v != expect}
        if len(seen) != self.n_layers or bad:
            raise ModelError(
                f"adapter {self.adapter.name!r} self-check failed: down-projection hook "
                f"shapes {bad or seen} (expected {expect} on all {self.n_layers} layers)"
            )
        self._check_mlp_structure(ids)
        acts = self.activations(ids[0])
        # the neurons with the largest |activation| in the first and last layer
        checks = [(0, int(acts[0].abs().argmax())), (self.n_layers - 1, int(acts[-1].abs().argmax()))]
        for layer, neuron in checks:
            def zero(_l, h, layer=layer, neuron=neuron):
                if _l == layer:
                    h = h.clone()
                    h[..., neuron] = 0
                return h

            via_act = forward.next_token_logits(self, ids, act_fn=zero, layers=[layer])[0]
            vv = self.value_vectors(layer)
            saved = vv[neuron].clone()
            try:
                vv[neuron] = 0
                via_weight = forward.next_token_logits(self, ids)[0]
            finally:
                vv[neuron] = saved
            tol = atol * max(1.0, float(base.abs().max()))
            if (via_act - via_weight).abs().max() > tol:
                raise ModelError(
                    f"adapter {self.adapter.name!r} self-check failed: zeroing neuron "
                    f"({layer}, {neuron}) through its activation and through its value vector "
                    "give different logits; the hooked module is not the down projection"
                )
            if (via_act - base).abs().max() == 0 and float(acts[layer, neuron]) != 0:
                raise ModelError(
                    f"adapter {self.adapter.name!r} self-check failed: zeroing neuron "
                    f"({layer}, {neuron}) did not change the logits"
                )
        self.checked = True


#: Weight files ``from_pretrained`` reads, by preference: safetensors, else PyTorch pickles.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
HASH_CACHE_FILE = "file-sha256.json"

#: Digests of this process: (resolved path, size, mtime in ns) -> sha256.
_FILE_SHA256: dict[tuple[str, int, int], str] = {}


def weight_files(directory: str | Path) -> tuple[Path, ...]:
    """The weight files of a model directory (sorted), the first of
    :data:`WEIGHT_PATTERNS` that matches; empty when there are none."""
    root = Path(directory)
    for pattern in WEIGHT_PATTERNS:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return tuple(found)
    return ()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, computed once per (path, size, mtime).

    Digests are kept for this process and in ``file-sha256.json`` in knowloc's cache
    directory (:func:`knowloc.embedded.cache_dir`), so hashing a model's weights again, here
    or in a later process, costs nothing until the file changes.
    """
    from .. import embedded

    resolved = Path(path).resolve()
    stat = resolved.stat()
    entry = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if entry in _FILE_SHA256:
        return _FILE_SHA256[entry]
    cache_path = embedded.cache_dir() / HASH_CACHE_FILE
    cache = _read_hash_cache(cache_path)
    text_key = f"{entry[0]}|{entry[1]}|{entry[2]}"
    digest = cache.get(text_key)
    if not isinstance(digest, str):
        sha = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
        cache = {k: v for k, v in cache.items() if _still_there(k)}
        cache[text_key] = digest
        _write_hash_cache(cache_path, cache)
    _FILE_SHA256[entry] = digest
    return digest


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _still_there(text_key: str) -> bool:
    """Whether a digest cache entry ``path|size|mtime_ns`` still names the file as it is."""
    path, _, rest = text_key.partition("|")
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return rest == f"{stat.st_size}|{stat.st_mtime_ns}"


def _write_hash_cache(path: Path, cache: dict[str, Any]) -> None:
    """Write the digest cache atomically; a cache that cannot be written is only logged."""
    from ..store import atomic_write_text  # (the store imports pandas: only when writing)

    try:
        atomic_write_text(path, json.dumps(cache, indent=0, sort_keys=True), fsync=False)
    except OSError as exc:
        log.debug("cannot write the weights digest cache %s: %s", path, exc)


def _state_dict_sha256(module: nn.Module) -> str:
    """sha256 of every state-dict tensor: name, dtype, shape and bytes, in name order."""
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(f"{name}\t{str(t.dtype).replace('torch.', '')}\t"
                   f"{list(tensor.shape)}\n".encode())
        sha.update(t.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _hub_weight_files(name: str, revision: str | None) -> tuple[Path, ...]:
    """The weight files of a hub id in the local Hugging Face cache (empty when unknown)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception as exc:  # noqa: BLE001 - any failure only means "files unknown"
        log.debug("cannot locate %s in the Hugging Face cache: %s", name, exc)
        return ()
    return weight_files(Path(found).parent) if isinstance(found, str) else ()


def wrap(hf_model: nn.Module, tokenizer: Any, *, name: str | None = None, check: bool = True) -> Model:
    """Wrap an in-memory transformers causal LM (frozen, eval mode) as a :class:`Model`."""
    adapter = find_adapter(hf_model.config)
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    model = Model(
        hf=hf_model,
        tokenizer=tokenizer,
        adapter=adapter,
        name=name or compat.source_name(hf_model.config) or adapter.name,
        revision=compat.source_revision(hf_model.config),
    )
    if check:
        model.self_check()
    return model


def load_model(
    name: str = "gemma3-270m",
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    check: bool = True,
) -> Model:
    """Load a model by embedded name (``gemma3-270m``, ``smollm2-135m``), local dir or HF id.

    Nothing is downloaded unless a hub is reachable; an id that is neither embedded nor a
    local directory and cannot be fetched raises :class:`ModelError`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import embedded

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    source = name
    if name in embedded.EMBEDDED:
        source = str(embedded.embedded_model_dir(name))
    elif not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") is None:
        log.info("loading %s from the Hugging Face hub (or its local cache)", name)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelError(
            f"cannot load model {name!r}: {exc}. Use an embedded model "
            f"({', '.join(embedded.EMBEDDED)}), a local directory, or a cached Hugging Face id"
        ) from exc
    find_adapter(config)  # fail early with the list of supported architectures
    kwargs: dict[str, Any] = {"dtype": dt}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from exc
    hf.to(dev)  # type: ignore[arg-type]
    model = wrap(hf, tok, name=name, check=check)
    model.weights_from = (weight_files(source) if Path(source).is_dir()
                          else _hub_weight_files(source, model.revision))
    return model
