"""ops/Dockerfile and .dockerignore: structural checks, and broken copies rejected.

No Docker engine runs on the CI machines, so the image is never built here;
these checks catch what would break the build or the image's safety: a
single stage, a root user, a COPY of a path that does not exist or that
.dockerignore leaves out of the context, no way to pick CUDA wheels.
"""

from __future__ import annotations

import pytest
from ops_validation import DOCKERFILE, DOCKERIGNORE, Mutation, dockerfile_problems, replace

TEXT = DOCKERFILE.read_text()
IGNORE = DOCKERIGNORE.read_text()

BREAKS: dict[str, tuple[Mutation, str]] = {
    "single stage": (
        replace("FROM ${BASE_IMAGE} AS runtime", "# (no runtime stage)"),
        "not multi-stage",
    ),
    "runs as root": (replace("USER 10001:10001", "USER root"), "runs as root"),
    "no USER at all": (replace("USER 10001:10001\n", ""), "runs as root"),
    "torch index not a build argument": (
        replace("ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu", "ENV TORCH_INDEX=cpu"),
        "no build argument TORCH_INDEX",
    ),
    "COPY of a missing path": (
        replace("COPY drift ./drift", "COPY drifts ./drift"),
        "COPY source drifts does not exist",
    ),
    "a package left out": (
        replace("COPY models ./models\n", ""),
        "package fogline.models (folder models, pyproject.toml) is not copied into the image",
    ),
    "not running fogline": (
        replace('ENTRYPOINT ["fogline"]', 'ENTRYPOINT ["python"]'),
        "does not run fogline",
    ),
}


def test_dockerfile_is_valid() -> None:
    assert dockerfile_problems(TEXT, IGNORE) == []


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_dockerfile_check_rejects_broken_copy(name: str) -> None:
    mutate, expected = BREAKS[name]
    problems = dockerfile_problems(mutate(TEXT), IGNORE)
    assert any(expected in p for p in problems), (name, problems)


def test_dockerignore_must_not_drop_a_package() -> None:
    problems = dockerfile_problems(TEXT, IGNORE + "models\n")
    assert problems == ["COPY source models is excluded by .dockerignore"]


def test_dockerignore_keeps_secrets_and_environments_out() -> None:
    lines = set(IGNORE.splitlines())
    assert {".env", ".venv", ".git", "*.safetensors"} <= lines
