"""Administer a team's authenticated tracking server (`mlflow server --app-name basic-auth`).

    python -m dae.team setup [--dataset mnist]        the experiment and its four registered models
    python -m dae.team add-user NAME [--edit]         a teammate (EDIT) or a viewer (READ)
    python -m dae.team new-password NAME              a fresh password for NAME (admin: its own)

Run as the server's admin: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD name the server and the admin. Passwords are generated here and printed
once, so they never pass through a command line or a shell history.

The admin creates the experiment and the registered models, so that no other user owns them
(in MLflow's basic-auth app, whoever creates a resource may manage it). The server's
default_permission READ lets every user see everything; `--edit` grants one teammate EDIT on
the experiment (log runs) and on the registered models (add versions, move the alias).
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from dae.params import MODELS
from dae.tracking import experiment_name, registered_model_name

PASSWORD_BYTES = 18  # 24 URL-safe characters; the auth app asks for at least 12


def _clients():
    """The auth app's client and MLflow's, as the admin named by the environment."""
    import warnings

    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise SystemExit("set MLFLOW_TRACKING_URI to the tracking server (http://host:port)")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SystemExit("set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to the server's admin")
    with warnings.catch_warnings():  # the auth client imports MLflow's server app, which warns
        warnings.simplefilter("ignore")
        from mlflow.server import get_app_client

        auth = get_app_client("basic-auth", tracking_uri=uri)
    return auth, mlflow.MlflowClient(uri)


def resources(dataset: str) -> tuple[str, list[str]]:
    """The experiment and the registered models a dataset's pipeline writes to."""
    return experiment_name(dataset), [registered_model_name(dataset, m) for m in MODELS]


def setup(dataset: str) -> None:
    from mlflow.exceptions import MlflowException

    _, client = _clients()
    experiment, models = resources(dataset)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment)
    for name in models:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    print(f"experiment {experiment} and registered models {', '.join(models)} are owned by the admin")


def add_user(name: str, edit: bool, dataset: str) -> None:
    auth, client = _clients()
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    auth.create_user(name, password)
    if edit:
        experiment, models = resources(dataset)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise SystemExit(f"no experiment {experiment!r} yet: run `python -m dae.team setup` first")
        auth.grant_user_permission(name, "experiment", found.experiment_id, "EDIT")
        for model in models:
            auth.grant_user_permission(name, "registered_model", model, "EDIT")
    role = f"EDIT on {resources(dataset)[0]} and its models" if edit else "READ only"
    print(f"user {name} ({role}); password, shown once: {password}")


def new_password(name: str) -> None:
    auth, _ = _clients()
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    if name == os.environ["MLFLOW_TRACKING_USERNAME"]:  # one's own: the server asks for the current one
        auth.update_user_password(name, password, current_password=os.environ["MLFLOW_TRACKING_PASSWORD"])
    else:
        auth.update_user_password(name, password)
    print(f"new password for {name}, shown once: {password}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dae.team", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", help="whose experiment and models (default: mnist)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="create the experiment and its registered models")
    add = commands.add_parser("add-user", help="create a user with a generated password")
    add.add_argument("name")
    add.add_argument("--edit", action="store_true", help="may log runs and register models")
    renew = commands.add_parser("new-password", help="give a user (or the admin) a new generated password")
    renew.add_argument("name")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        if args.command == "setup":
            setup(args.dataset)
        elif args.command == "add-user":
            add_user(args.name, args.edit, args.dataset)
        else:
            new_password(args.name)
    except MlflowException as exc:
        sys.exit(f"{parser.prog} {args.command}: {exc.message if hasattr(exc, 'message') else exc}")


if __name__ == "__main__":
    main()
