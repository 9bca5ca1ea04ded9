"""dvc.yaml declares what each stage's outputs depend on, so DVC reruns exactly what a change touches."""
import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Imported by stages but shaping none of their outputs: MLflow logging and the atomic writing of
# files whose contents other modules compute, and the DAE_* switches (mirrors, resuming).
NOT_DEPENDENCIES = ("dae/tracking/", "dae/io.py", "dae/env.py")


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
            if not (ROOT / rel).exists():  # a package: its __init__.py
                rel = name.replace(".", "/") + "/__init__.py"
            if (ROOT / rel).exists() and rel != "dae/__init__.py" and rel not in seen:
                seen.add(rel)
                if not rel.startswith(NOT_DEPENDENCIES):  # what they import shapes no output either
                    _dae_modules(ROOT / rel, seen)
    return seen


def test_every_stage_depends_on_the_code_that_computes_its_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"download", "noise", "pretrain_layer", "finetune", "evaluate", "figures"}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1).replace(".", "/") + ".py"
        deps = {dep for dep in stage["deps"] if isinstance(dep, str)}
        needed = {script} | {m for m in _dae_modules(ROOT / script, set()) if not m.startswith(NOT_DEPENDENCIES)}
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


def test_no_stage_writes_a_path_of_dvc_yaml_again():
    """dvc.yaml is the one source of paths: the stages get theirs from the command line."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = set()
    for stage in stages.values():
        stage = stage.get("do", stage)
        for key in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                if path.startswith(("data/", "reports/")) and "$" not in path:
                    paths.add(path)
    paths |= {str(Path(p).parent) for p in paths if "/" in str(Path(p).parent)}
    for script in (ROOT / "stages").glob("*.py"):
        text = script.read_text()
        written = sorted(p for p in paths if f'"{p}' in text or f"'{p}" in text)
        assert not written, f"{script.name} writes {written}; pass it on the command line in dvc.yaml"


def test_the_device_script_runs_every_stage_once_after_its_inputs():
    """stages.common.stage_commands, with which bench/device_run.py runs dvc.yaml's stages without
    DVC (a GPU machine has none): every stage once, each after the stages whose outputs it reads,
    with dvc.yaml's command line."""
    import sys

    from stages.common import stage_commands

    commands = stage_commands(ROOT / "dvc.yaml")
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert sorted(name for name, _ in commands) == sorted(locked)
    for i, (name, argv) in enumerate(commands):
        assert argv[0] == sys.executable and argv[1] == "-m" and argv[2].startswith("stages.")
        assert " ".join(argv[1:]).endswith(locked[name]["cmd"].split(" ", 1)[1])  # dvc.yaml's command line
        for dep in locked[name].get("deps", []):
            later = [other for other, _ in commands[i + 1:]
                     if any(out["path"] == dep["path"] or out["path"].startswith(dep["path"] + "/")
                            for out in locked[other].get("outs", []))]
            assert not later, f"{name} runs before {later}, which make its input {dep['path']}"
