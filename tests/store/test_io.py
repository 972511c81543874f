"""The one atomic write: complete or absent, UTF-8 whatever the locale, same bytes as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from knowloc.store import atomic_write, atomic_write_text, write_csv, write_json

TEXT = "Zürich — 東京 ✓ naïve\nsecond line\n"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_raises_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    atomic_write_text(target, "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("new, but only ha", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text(encoding="utf-8") == "old\n"
    assert _leftovers(tmp_path) == []

    class Frame(pd.DataFrame):
        def to_csv(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise KeyboardInterrupt  # even an interrupt leaves nothing behind

    with pytest.raises(KeyboardInterrupt):
        write_csv(target, Frame({"a": [1]}))
    assert target.read_text(encoding="utf-8") == "old\n"
    assert _leftovers(tmp_path) == []


def test_a_failed_move_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    write_json(target, {"v": 1})

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text(encoding="utf-8")) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_folders_are_created_and_the_new_content_replaces_the_old(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    assert atomic_write_text(target, "one") == target
    atomic_write_text(target, "two", fsync=False)
    assert target.read_bytes() == b"two"
    assert _leftovers(target.parent) == []


def test_text_is_utf8_with_its_newlines_kept(tmp_path: Path) -> None:
    target = tmp_path / "t.md"
    atomic_write_text(target, TEXT)
    assert target.read_bytes() == TEXT.encode("utf-8")
    atomic_write_text(target, "a\r\nb\n")  # no newline translation either way
    assert target.read_bytes() == b"a\r\nb\n"


def test_csv_bytes_equal_pandas_to_csv(tmp_path: Path) -> None:
    """``write_csv`` writes what ``DataFrame.to_csv(path, index=False)`` wrote before."""
    df = pd.DataFrame({
        "relation": ["P36", "P1376", "Zürich, \"quoted\"", None],
        "score": [0.1, 1 / 3, np.nan, -2.5e-12],
        "n": pd.Series([1, 2, 3, 4], dtype="int64"),
        "flag": [True, False, True, None],
        "text": ["multi\nline", "東京", "", "tab\there"],
    })
    reference = tmp_path / "reference.csv"
    df.to_csv(reference, index=False)
    ours = write_csv(tmp_path / "ours.csv", df)
    assert ours.read_bytes() == reference.read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(ours), pd.read_csv(reference))


def test_json_is_utf8_and_ends_with_a_newline(tmp_path: Path) -> None:
    target = write_json(tmp_path / "env.json", {"city": "Zürich", "x": float("nan")})
    raw = target.read_bytes()
    assert raw == json.dumps({"city": "Zürich", "x": float("nan")}, indent=2,
                             ensure_ascii=False).encode("utf-8") + b"\n"
    write_json(target, {"city": "Zürich"}, ensure_ascii=True, indent=None)
    assert target.read_bytes() == b'{"city": "Z\\u00fcrich"}\n'


def test_non_ascii_round_trips_under_the_c_locale(tmp_path: Path) -> None:
    """Another process with an ASCII locale writes and reads the same UTF-8 bytes."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    code = textwrap.dedent("""
        import locale, sys
        from pathlib import Path
        import pandas as pd
        from knowloc.store import RunStore, atomic_write_text, write_csv
        text = Path(sys.argv[1]).read_bytes().decode("utf-8")
        folder = Path(sys.argv[2])
        atomic_write_text(folder / "t.md", text)
        write_csv(folder / "t.csv", pd.DataFrame({"name": [text]}))
        store = RunStore(folder / "run")
        store.write_config({"fingerprint": {"name": text}})
        store.write_env({"name": text})
        back = store.read_config()["fingerprint"]["name"] == text
        print(locale.getpreferredencoding(False), back)
        """)
    source = tmp_path / "source.txt"
    source.write_bytes(TEXT.encode("utf-8"))
    done = subprocess.run([sys.executable, "-c", code, str(source), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    encoding, back = done.stdout.split()
    assert back == "True"
    if sys.platform != "win32":
        assert encoding.lower().replace("-", "") != "utf8"  # the locale really is ASCII
    assert (tmp_path / "t.md").read_bytes() == TEXT.encode("utf-8")
    assert pd.read_csv(tmp_path / "t.csv", encoding="utf-8")["name"].tolist() == [TEXT]
    assert "Zürich — 東京" in (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8")
    env_json = json.loads((tmp_path / "run" / "env.json").read_text(encoding="utf-8"))
    assert env_json["runs"][0]["name"] == TEXT
