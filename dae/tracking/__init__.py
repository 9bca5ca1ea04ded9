"""MLflow tracking: one run per pipeline stage, a nested run per member (seed, or model and seed),
shared pipeline tags, and the trained models in the Model Registry.

runs.py      the stage's run and its members' nested runs (stage_run, StageRun, MemberRuns)
store.py     where runs go (SQLite at the repository root, or $MLFLOW_TRACKING_URI), HTTP retries,
             the SQLite lock, one-line errors
registry.py  trained denoisers as MLflow models, and their registered versions

The default store is SQLite in the stage's `root` (`mlflow.db`, artifacts in `mlruns/`);
`MLFLOW_TRACKING_URI` overrides it (e.g. a tracking server); `DAE_TRACKING=off` disables tracking.
A tracking server that is unreachable, or refuses the user, stops a stage at its start, before any
training, with one line. A server (or its database) that goes away while a stage trains is waited
for: MLflow's client retries each request with exponential backoff for about two minutes; if it is
still gone, the stage stops with one line before it writes its outputs, and `dvc repro` resumes
from the last completed epoch once the server is back.
"""
from dae.tracking.registry import CURRENT_ALIAS, registered_model_name
from dae.tracking.runs import (MemberRuns, StageRun, dataset_inputs, enabled, experiment_name, pipeline_tags,
                               stage_run)
from dae.tracking.store import TrackingError, tracking_uri

__all__ = ["CURRENT_ALIAS", "MemberRuns", "StageRun", "TrackingError", "dataset_inputs", "enabled", "experiment_name",
           "pipeline_tags", "registered_model_name", "stage_run", "tracking_uri"]
