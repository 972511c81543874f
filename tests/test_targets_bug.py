"""Bug report (runs on the code before the fix too, and fails there): on the embedded
Gemma, " 2012" begins with the bare space token " " -- the model's top-1 after the prompt
(P = 0.92) -- so `modify` counted the wrong year "2012" as known and `intervene` measured
P(" "). With the default target (``first``: the space extended to the first digit) the
fact is not known and P is P(" ") P("2" | " ")."""

from __future__ import annotations

import pytest
import torch

from knowloc.pipeline.mapping import MappingUnit, intervene_fact
from knowloc.pipeline.modify import EditUnit, PPLSpec, edit_fact

TURING = "Alan Turing was born in the year"


@pytest.mark.slow
def test_a_year_is_not_known_through_its_leading_space(gemma):
    ids = gemma.encode_prompt(TURING)
    space, two = gemma.answer_ids(TURING, "2012")[:2]
    assert gemma.tokenizer.decode([space]) == " " and gemma.tokenizer.decode([two]) == "2"
    with torch.no_grad():
        logits = gemma.hf(input_ids=torch.tensor([ids + [space]])).logits[0, -2:].double()
    p_space = float(logits[0].softmax(-1)[space])
    p_two = float(logits[1].softmax(-1)[two])
    assert int(logits[0].argmax()) == space and p_space > 0.8
    assert int(logits[1].argmax()) != two
    unit = EditUnit(key="k", scope="bug", method="ig", relation="R", fact_id="f", op="erase",
                    set_kind="local", queries=(("q", TURING, "2012"),),
                    sets=(("q", ((10, 5),)),), cas=(), new_object=None, locality=(),
                    locality_ids=(), locality_kind="none", lambda1=2.0, lambda2=2.0,
                    update_sign="none", gen_on="known", ppl=PPLSpec(None, 1, 2, 16, 0))
    assert edit_fact(gemma, unit)["edits"]["status"].tolist() == ["not known"]
    rows = intervene_fact(gemma, MappingUnit("ig", "R", "f", (("q", TURING, "2012"),),
                                             (("q", ((10, 5),)),), 0.0, 2.0))["interventions"]
    assert rows["p_before"].iloc[0] == pytest.approx(p_space * p_two, rel=1e-4)
