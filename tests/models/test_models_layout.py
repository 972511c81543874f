"""models/ is layered: ``Model`` holds structure, tokenization and hooks; every forward pass
lives in forward.py, which calls nothing on a Model that runs a forward pass."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from knowloc import models
from knowloc.models import Model, forward, self_check

SRC = Path(models.__file__).resolve().parent
PROMPT = "the official language of brazil is"


def _model_attributes_used(path: Path) -> set[str]:
    """Attributes read on a variable named ``model`` in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "model"}


def _source(attr: str) -> str:
    obj = inspect.getattr_static(Model, attr)
    if isinstance(obj, property):
        assert obj.fget is not None
        obj = obj.fget
    return inspect.getsource(obj)


def _runs_forward(attr: str) -> bool:
    """Whether ``Model.<attr>`` reaches forward.py (the module named as a word: not a torch
    ``register_forward_hook``)."""
    return re.search(r"\bforward\b", _source(attr)) is not None


def test_forward_uses_no_model_method_that_calls_forward() -> None:
    used = _model_attributes_used(SRC / "forward.py")
    assert {"hook_activations", "base_model", "unembedding"} <= used
    assert all(hasattr(Model, a) for a in used), used - set(dir(Model))
    assert [a for a in used if _runs_forward(a)] == []


def test_model_has_no_method_that_runs_a_forward_pass() -> None:
    """Model holds structure, tokenization and hooks; every pass is a function of forward.py
    (``prompt_probs(model, prompts)``, ``prompt_activations(model, ids)``, ...)."""
    runs = {name for name, _ in inspect.getmembers(Model, callable)
            if not name.startswith("__") and _runs_forward(name)}
    assert runs == set()


def test_forward_and_the_self_check_never_hash_the_weights(monkeypatch) -> None:
    m = tiny_model("llama")
    ids = m.encode_prompt(PROMPT)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("called back into the Model")

    monkeypatch.setattr(Model, "weights_identity", refuse)
    self_check(m)
    probs = forward.prompt_probs(m, [PROMPT, ids])
    torch.testing.assert_close(probs[0], probs[1])
    acts, p = forward.activations_and_probs(m, ids)
    torch.testing.assert_close(acts, forward.prompt_activations(m, ids).float())
    torch.testing.assert_close(p, probs[0])
    forward.answer_scores(m, [ids], [m.answer_ids(PROMPT, "portuguese")])


@pytest.mark.parametrize("module", sorted(p.name for p in SRC.glob("*.py")))
def test_every_module_is_under_600_lines(module: str) -> None:
    assert len((SRC / module).read_text(encoding="utf-8").splitlines()) < 600


def test_model_module_runs_nothing() -> None:
    """model.py imports neither forward.py nor the self-check at module level."""
    tree = ast.parse((SRC / "model.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert all(n.module not in ("forward", "selfcheck", "load") for n in top)
