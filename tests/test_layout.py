"""The house's shape, checked from the code itself.

- Layering, from the imports (an AST walk over ``zoo/``): ``zoo.core`` imports nothing else of the zoo; a family
  (``LAYER = "family"`` in its ``__init__``) imports only core; a paper imports core and at most one family, and
  another paper only when its ``__init__`` declares ``REUSES_TRAINING_STEP_OF = ("<paper>",)``. Experiment files
  obey the same rule through their ``class_path`` entries.
- A copied paper folder works: each paper, with only ``zoo/core``, its family (and a declared reused paper) beside
  it in a fresh tree, imports and trains its smallest experiment for one step.
- Offline overlays (``experiments/offline/<stem>.yaml``) each belong to an experiment file.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import offline_overlay
from zoo.tools.smoke import smoke_args

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo"
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def _package_constant(package: str, name: str):
    init = ZOO / package / "__init__.py"
    for node in ast.parse(init.read_text()).body if init.exists() else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


PACKAGES = sorted(p.name for p in ZOO.iterdir() if (p / "__init__.py").exists())
LAYERS = {p: _package_constant(p, "LAYER") or "paper" for p in PACKAGES}
FAMILIES = {p for p, layer in LAYERS.items() if layer == "family"}
PAPERS = sorted(p for p, layer in LAYERS.items() if layer == "paper")


def zoo_imports(package: str) -> dict[str, set[str]]:
    """Top-level zoo packages imported by each file of ``package`` (absolute and relative imports)."""
    found = {}
    for path in sorted((ZOO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this file's package path
                    parts = ["zoo", *path.relative_to(ZOO).parts[:-1]]
                    base = parts[: len(parts) - node.level + 1]
                    names.add(".".join(base + ([node.module] if node.module else [])))
                elif node.module:
                    names.add(node.module)
        found[str(path.relative_to(ROOT))] = {n.split(".")[1] for n in names if n.startswith("zoo.")}
    return found


def experiment_packages(config: Path) -> set[str]:
    """Zoo packages named by ``class_path`` (or a class given as a string) anywhere in an experiment file."""
    out = set()

    def walk(node):
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node.startswith("zoo.") and node.count(".") >= 2:
            out.add(node.split(".")[1])

    walk(yaml.safe_load(config.read_text()))
    return out


def allowed_for(package: str) -> set[str]:
    layer = LAYERS[package]
    if layer == "core":
        return {"core"}
    if layer == "family":
        return {"core", package}
    if layer == "tools":
        return set(PACKAGES)
    return {"core", package, *FAMILIES, *(_package_constant(package, "REUSES_TRAINING_STEP_OF") or ())}


def test_the_layers_exist():
    assert LAYERS["core"] == "core" and LAYERS["tools"] == "tools"
    assert {"semisup", "segda", "lm"} <= FAMILIES
    assert len(PAPERS) >= 13


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layers(package):
    imports = zoo_imports(package)
    used = set().union(*imports.values()) if imports else set()
    bad = {f: sorted(i - allowed_for(package)) for f, i in imports.items() if i - allowed_for(package)}
    assert not bad, f"{package} ({LAYERS[package]}) imports outside its layer: {bad}"
    if LAYERS[package] == "paper":
        families = used & FAMILIES
        assert len(families) <= 1, f"paper {package} imports {len(families)} families: {sorted(families)}"


def test_the_layering_check_catches_a_core_module_importing_a_family(tmp_path, monkeypatch):
    """The walk itself must see a violation (a check that passes on broken code is no check)."""
    fake = tmp_path / "zoo"
    shutil.copytree(ZOO / "core", fake / "core")
    (fake / "core" / "extra.py").write_text("from zoo.segda.host import DAFormerSelfTraining\nfrom ..lm import tiny\n")
    monkeypatch.setattr(sys.modules[__name__], "ZOO", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert zoo_imports("core")["zoo/core/extra.py"] == {"segda", "lm"}


def _paper_of(config: Path) -> str | None:
    packages = experiment_packages(config) & set(PAPERS)
    return max(packages, key=lambda p: config.stem.startswith(p)) if packages else None


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[c.stem for c in EXPERIMENTS])
def test_experiment_files_follow_the_layers(config):
    packages = experiment_packages(config)
    paper = _paper_of(config)
    owner = paper or next(iter(packages & FAMILIES), None)
    assert owner, f"{config.name} names no zoo class"
    assert packages <= allowed_for(owner), f"{config.name}: {sorted(packages - allowed_for(owner))}"
    assert len(packages & FAMILIES) <= 1


def test_offline_overlays_belong_to_an_experiment():
    overlays = sorted((ROOT / "experiments" / "offline").glob("*.yaml"))
    assert overlays, "paper settings that need internet have offline overlays"
    orphans = [o.name for o in overlays if not (ROOT / "experiments" / o.name).exists()]
    assert not orphans, f"overlays without an experiment file: {orphans}"
    for overlay in overlays:
        assert set(yaml.safe_load(overlay.read_text())) <= {"model", "data", "trainer"}, overlay.name


# ------------------------------------------------------------------------------------------ copy a folder
def needs(paper: str) -> set[str]:
    """What a copied paper needs beside it: core, the family its code or experiments use, declared reused papers."""
    used = set().union(*zoo_imports(paper).values())
    for config in EXPERIMENTS:
        if _paper_of(config) == paper:
            used |= experiment_packages(config)
    return (used | {"core"}) - {paper}


def smallest_experiment(paper: str) -> Path:
    """The paper's cheapest runnable setting: one without an offline overlay if there is one, fewest max_steps."""
    mine = [c for c in EXPERIMENTS if _paper_of(c) == paper]
    assert mine, f"paper {paper} has no experiment file"

    def cost(config: Path):
        steps = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_steps") or 10**9
        return (bool(offline_overlay(config)), steps, config.stem)

    return min(mine, key=cost)


COPY_RUNNER = """
import json, sys
plan = json.loads(sys.argv[1])
for tree, args in plan:
    for name in [m for m in sys.modules if m == "zoo" or m.startswith("zoo.")]:
        del sys.modules[name]
    sys.path.insert(0, tree)
    from zoo.core.cli import ZooCLI
    import zoo
    assert zoo.__file__.startswith(tree), zoo.__file__
    cli = ZooCLI(args=args)
    assert cli.trainer.global_step == 1, cli.trainer.global_step
    print("COPIED-OK", tree, flush=True)
    sys.path.remove(tree)
"""


def test_every_paper_runs_from_a_copied_folder(tmp_path):
    """Each paper folder, copied with only what it needs beside it, trains one step of its smallest experiment.

    All copies run in one interpreter (torch and Lightning import once), each from its own tree with the zoo's
    modules purged between them, so an import of anything not copied fails there."""
    plan, copied = [], {}
    for paper in PAPERS:
        tree = tmp_path / paper
        (tree / "zoo").mkdir(parents=True)
        for name in ("__init__.py", "__main__.py"):
            shutil.copy(ZOO / name, tree / "zoo" / name)
        beside = needs(paper)
        assert beside - {"core"} <= FAMILIES | set(_package_constant(paper, "REUSES_TRAINING_STEP_OF") or ()), beside
        for package in beside | {paper}:
            shutil.copytree(ZOO / package, tree / "zoo" / package, ignore=shutil.ignore_patterns("__pycache__"))
        config = smallest_experiment(paper)
        args = smoke_args(str(config), str(tmp_path / "runs"), overlays=offline_overlay(config))
        args += ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                 f"--run.name={paper}"]
        plan.append([str(tree), args])
        copied[paper] = sorted(beside)
    result = subprocess.run([sys.executable, "-c", COPY_RUNNER, json.dumps(plan)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=1500)
    ran = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("COPIED-OK")]
    assert result.returncode == 0 and len(ran) == len(PAPERS), (
        f"copied papers that ran: {[Path(t).name for t in ran]} of {PAPERS}\n{result.stderr[-4000:]}")
    print("copy-a-folder:", json.dumps(copied))
