"""``knowloc localize --prompt P --answer A`` prints, and writes into ``--json`` and
``summary.json``, each method's completeness gap: the attribution's own values (tiny model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from knowloc.attribution.convergence import GAP_LIMIT, format_gap

PROMPT, ANSWER = "the official language of brazil is", "portuguese"


@pytest.fixture(scope="module")
def own_gaps(tiny_dir: Path) -> dict[str, list[float]]:
    """Each method's per-layer gap from the library on the same model and query."""
    from knowloc import load_model
    from knowloc.attribution import Attribution, attribute

    model = load_model(str(tiny_dir))
    out = {}
    for method in ("ig", "sig", "amig"):
        attr = attribute(model, (PROMPT, ANSWER), method, n_steps=3, progress=False)
        assert isinstance(attr, Attribution) and attr.completeness_gap is not None
        out[method] = attr.completeness_gap.tolist()
    return out


def localize(tiny_dir: Path, *extra: str) -> list[str]:
    return ["-q", "localize", "--model", str(tiny_dir), "--prompt", PROMPT, "--answer", ANSWER,
            "--n-steps", "3", *extra]


def test_printout_has_each_methods_gap(tiny_dir: Path, own_gaps: dict, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from knowloc.cli import main

    capsys.readouterr()
    assert main(localize(tiny_dir, "--method", "ig,sig,amig", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    lines = [ln.strip() for ln in out.splitlines() if "completeness gap:" in ln]
    assert len(lines) == 3
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    for line, method in zip(lines, ("ig", "sig", "amig")):
        gaps = own_gaps[method]
        largest = max(gaps)
        above = sum(g > GAP_LIMIT for g in gaps)
        assert line == (f"completeness gap: {format_gap(largest)} (largest over layers, layer "
                        f"{gaps.index(largest)}); {above} of {len(gaps)} layers above 5%")
        shown = float(re.search(r"gap: ([0-9.]+)%", line).group(1))  # type: ignore[union-attr]
        assert shown == pytest.approx(100 * largest, abs=0.05)
        entry = summary["methods"][method]
        assert entry["completeness_gap"] == largest
        assert entry["completeness_gap_per_layer"] == gaps
        assert entry["completeness_gap_layer"] == gaps.index(largest)
        assert entry["layers_above_gap_limit"] == above and entry["gap_limit"] == GAP_LIMIT
    # the warning follows the gap line exactly when the largest gap is above the limit
    raw = out.splitlines()
    assert "has not converged" in out  # 3 points are too few on this model
    for i, ln in enumerate(raw):
        if "completeness gap:" in ln:
            pct = float(re.search(r"gap: ([0-9.]+)%", ln).group(1))  # type: ignore[union-attr]
            warned = "has not converged" in raw[i + 1]
            assert warned == (pct / 100 > GAP_LIMIT)
            if warned:
                assert "--n-steps" in raw[i + 1]


def test_json_carries_the_gap(tiny_dir: Path, own_gaps: dict,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from knowloc.cli import main

    capsys.readouterr()
    assert main(localize(tiny_dir, "--method", "sig", "--json")) == 0
    obj = json.loads(capsys.readouterr().out)
    gaps = own_gaps["sig"]
    assert obj["completeness_gap"] == max(gaps)
    assert obj["completeness_gap_per_layer"] == gaps
    assert obj["completeness_gap_layer"] == gaps.index(max(gaps))
    assert obj["rule"] == "riemann_right"


def test_converged_attribution_prints_no_warning(tiny_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """With enough points the tiny model's SIG gap falls under 5% and no warning is
    printed (the gap shrinks with the number of points)."""
    from knowloc.cli import main

    capsys.readouterr()
    assert main(localize(tiny_dir, "--method", "sig", "--rule", "gausslegendre",
                         "--n-steps", "32")) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "completeness gap:" in ln)
    assert "0 of 3 layers above 5%" in line
    assert "has not converged" not in out
