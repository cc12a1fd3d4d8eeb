"""The fogline commands that the deployment files and the operator docs run are real.

Every ``fogline <sub-command> ...`` written in ops/runbook.md and
docs/operations.md, and every container command in docker-compose.yml and the
Kubernetes manifests, must parse with the real CLI parser
(:func:`fogline.cli.build_parser`), so a renamed flag breaks this test rather
than an operator's rollback at night.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex

import pytest
import yaml
from ops_validation import COMPOSE_FILE, ROOT, RUNBOOK, k8s_manifest_paths, replace

from fogline.cli import build_parser

DOCS = {
    "ops/runbook.md": RUNBOOK.read_text(),
    "docs/operations.md": (ROOT / "docs" / "operations.md").read_text(),
}
#: Placeholders in the docs and what to parse them as.
PLACEHOLDERS = {"NAME": "default", "V": "41"}
_COMMAND = re.compile(r"(?<![\w.-])fogline((?:[ \t]+[^\s`|&;\\]+)+)")


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


PARSER = build_parser()
SUBCOMMANDS = _subcommands(PARSER)


def doc_commands(text: str) -> list[list[str]]:
    """``fogline`` invocations in a document whose first word is a sub-command.

    A bare sub-command name (``fogline replay`` in prose) is a mention, not an
    invocation, and is left out.
    """
    found: list[list[str]] = []
    for m in _COMMAND.finditer(text):
        argv = [PLACEHOLDERS.get(t, t) for t in shlex.split(m.group(1))]
        if len(argv) > 1 and argv[0] in SUBCOMMANDS:
            found.append(argv)
    return found


def parse_problem(argv: list[str]) -> str | None:
    """``None`` when the CLI accepts ``argv``, else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            PARSER.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return f"fogline {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}"
    return None


def test_docs_name_fogline_commands() -> None:
    commands = [c for text in DOCS.values() for c in doc_commands(text)]
    assert ["snapshot", "rollback", "--model", "default", "41"] in commands
    assert len(commands) >= 10


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_documented_commands_parse(doc: str) -> None:
    problems = [p for argv in doc_commands(DOCS[doc]) if (p := parse_problem(argv))]
    assert problems == []


def test_a_wrong_documented_command_is_caught() -> None:
    broken = replace(
        "fogline snapshot rollback --model NAME 41",
        "fogline snapshot rollback --model NAME --version 41",
    )(DOCS["ops/runbook.md"])
    problems = [p for argv in doc_commands(broken) if (p := parse_problem(argv))]
    assert len(problems) == 1 and "--version" in problems[0]


def _deployment_commands() -> dict[str, list[str]]:
    commands: dict[str, list[str]] = {}
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    for name in ("fogline-daemon", "fogline-api"):
        commands[f"compose {name}"] = compose["services"][name]["command"]
    for path in k8s_manifest_paths():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    commands[f"k8s {doc['metadata']['name']}/{c['name']}"] = c["args"]
    return commands


DEPLOYMENT_COMMANDS = _deployment_commands()


@pytest.mark.parametrize("where", sorted(DEPLOYMENT_COMMANDS))
def test_deployment_commands_parse(where: str) -> None:
    argv = DEPLOYMENT_COMMANDS[where]
    if argv[0] not in SUBCOMMANDS:
        # `serve` comes with the query service (issue 5); until that lands the
        # command cannot be checked, and the skip says so.
        pytest.skip(f"{where}: fogline has no sub-command {argv[0]!r} (yet)")
    assert parse_problem(argv) is None
