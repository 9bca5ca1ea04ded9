"""stages/common.py: the stages' shell (the rest of it is exercised by the pipeline tests)."""
import os
from pathlib import Path

import yaml

from stages.common import declared_sections, tracking_root

ROOT = Path(__file__).resolve().parents[1]


def test_each_stage_reads_the_params_sections_dvc_yaml_declares():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert declared_sections("evaluate", ROOT / "dvc.yaml")[:2] == ["data", "noise"]
    assert declared_sections("pretrain_layer", ROOT / "dvc.yaml") == [
        p.split(".")[0] for p in stages["pretrain_layer"]["do"]["params"]]
    assert declared_sections("download", ROOT / "dvc.yaml") == ["data"]  # from data.dataset


def test_tracking_root_is_dvcs_root_and_a_queued_copy_is_not_the_workspace(tmp_path, monkeypatch):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what DVC sets for a queued or --temp experiment
    assert tracking_root() == (tmp_path.resolve(), False)
    monkeypatch.chdir(tmp_path)
    assert tracking_root() == (tmp_path.resolve(), True)
    monkeypatch.delenv("DVC_ROOT")  # a stage run by hand: the working directory
    assert tracking_root() == (Path(os.getcwd()).resolve(), True)
