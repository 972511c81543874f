"""Facts and their neighbor queries: ParaRel, the built-in set, and users' own JSONL files.

A *fact* ⟨s, r, o⟩ comes with *neighbor queries*: paraphrased cloze prompts that end right
before the object (METHODS.md §0). Every source is turned into the same shape:
:class:`FactSet` → :class:`Fact` → :class:`Query`.

Template rule (one rule for every source; see ``docs/data.md``):

* whitespace is normalized (runs collapsed to one space, ends stripped);
* ``[X]`` and ``[Y]`` each occur exactly once;
* ``[Y]`` is the last token: nothing may follow it except one optional ``.`` (with or
  without a space before it, as in ParaRel's ``"[Y] ."`` and ``"[Y]."``), which is removed;
* ``[Y]`` is a separate word (whitespace right before it), so the answer is predicted as a
  new word after the prompt.

The stored :attr:`Query.template` therefore always ends with ``" [Y]"``, and
:attr:`Query.prompt` is the template up to (not including) the space before ``[Y]``, with
``[X]`` replaced by the subject. ParaRel patterns that break the rule are dropped and
counted in :attr:`FactSet.skipped`; in JSONL files (built-in or user) they are an error.

The package's modules:

- :mod:`~knowloc.data.facts`: :class:`Query`, :class:`Fact`, :class:`FactSet`, the template
  rule (:func:`normalize_template`, :func:`make_prompt`), :func:`with_context` and
  :func:`natural_key`;
- :mod:`~knowloc.data.sources`: what every source is read into before selection (raw facts),
  the JSONL line reader and the relation check;
- :mod:`~knowloc.data.pararel`: ParaRel directories (:func:`pararel_relations`);
- :mod:`~knowloc.data.jsonl`: the built-in facts (:func:`builtin_path`) and users' JSONL files;
- :mod:`~knowloc.data.load`: :func:`load_facts`, which resolves a source and selects its facts
  and queries.
"""

from __future__ import annotations

from .facts import (
    SKIP_RELATION_NO_FACT_FILE,
    SKIP_RELATION_NO_TEMPLATES,
    SKIP_TEMPLATE_BAD,
    SKIP_TEMPLATE_DUP,
    SKIP_TEMPLATE_NOT_LAST,
    Fact,
    FactSet,
    Query,
    make_prompt,
    natural_key,
    normalize_template,
    with_context,
)
from .jsonl import builtin_path
from .load import SOURCE_FORMS, load_facts
from .pararel import pararel_relations

__all__ = [
    "SKIP_RELATION_NO_FACT_FILE",
    "SKIP_RELATION_NO_TEMPLATES",
    "SKIP_TEMPLATE_BAD",
    "SKIP_TEMPLATE_DUP",
    "SKIP_TEMPLATE_NOT_LAST",
    "SOURCE_FORMS",
    "Fact",
    "FactSet",
    "Query",
    "builtin_path",
    "load_facts",
    "make_prompt",
    "natural_key",
    "normalize_template",
    "pararel_relations",
    "with_context",
]
