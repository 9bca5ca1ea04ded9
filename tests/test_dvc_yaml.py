"""dvc.yaml declares what each stage's outputs depend on, so DVC reruns exactly what a change touches."""
import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Imported by stages but shaping none of their outputs: MLflow logging and the atomic writing of
# files whose contents other modules compute.
NOT_DEPENDENCIES = {"dae/tracking.py", "dae/io.py"}
# What stages.common gives a stage that feeds its computation (the rest is logging, params,
# error reporting); a stage that imports one of these depends on stages/common.py.
COMMON_DATA = {"load_split", "load_checkpoint", "training_checkpoint", "write_curve"}


def _dae_modules(path: Path, seen: set[str]) -> set[str]:
    """The dae/*.py files `path` imports, directly or through other dae modules."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dae":
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names if alias.name.split(".")[0] == "dae"]
        else:
            continue
        for name in candidates:
            rel = name.replace(".", "/") + ".py"
            if (ROOT / rel).exists() and rel != "dae/__init__.py" and rel not in seen:
                seen.add(rel)
                _dae_modules(ROOT / rel, seen)
    return seen


def _uses_common_data(path: Path) -> bool:
    return any(isinstance(node, ast.ImportFrom) and node.module == "stages.common"
               and COMMON_DATA & {alias.name for alias in node.names}
               for node in ast.walk(ast.parse(path.read_text())))


def test_every_stage_depends_on_the_code_that_computes_its_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"download", "noise", "pretrain_layer", "finetune", "evaluate", "figures"}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1).replace(".", "/") + ".py"
        deps = {dep for dep in stage["deps"] if isinstance(dep, str)}
        needed = {script} | (_dae_modules(ROOT / script, set()) - NOT_DEPENDENCIES)
        if _uses_common_data(ROOT / script):
            needed.add("stages/common.py")
        assert needed <= deps, f"stage {name} is missing deps {sorted(needed - deps)}"
        missing_files = [dep for dep in deps if "$" not in dep and not (ROOT / dep).exists()
                         and not dep.startswith("data/")]
        assert not missing_files, f"stage {name} lists deps that do not exist: {missing_files}"


def test_the_committed_lock_holds_only_the_stages_of_dvc_yaml():
    """`dvc repro` does not prune a stage that dvc.yaml dropped: a stale entry would show up in
    `dvc status` readers and confuse `dvc.lock` diffs, so the committed lock must match."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = set()
    for name, stage in stages.items():
        items = stage.get("foreach")
        names |= {f"{name}@{item}" for item in items} if items is not None else {name}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked == names
