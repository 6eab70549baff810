"""docker-compose.yml and the deploy/ files, checked against the settings the services really read.

Docker is not needed: the compose file is parsed as YAML and `${VAR:-default}` resolved by hand. The stack
itself is built and run in tests/compose/.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.common import settings as common_settings
from services.common.collection import REPO_ROOT
from services.common.settings import StoreSettings
from services.embedder.settings import EmbedderSettings
from services.indexer.settings import IndexerSettings
from services.search.settings import SearchSettings

COMPOSE = REPO_ROOT / "docker-compose.yml"
GPU_OVERRIDE = REPO_ROOT / "deploy" / "compose.gpu.yml"
SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "embedder": EmbedderSettings,
    "indexer": IndexerSettings,
    "search": SearchSettings,
}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_names(settings_class: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads: its prefix + each field name, upper-cased."""
    prefix = settings_class.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in settings_class.model_fields}


def known_env_names() -> set[str]:
    """What any settings class reads: the shared pieces, and each service's own class (the gateway's write keys)."""
    classes = [
        cls for _, cls in inspect.getmembers(common_settings, inspect.isclass)
        if issubclass(cls, BaseSettings) and cls.__module__ == common_settings.__name__
    ] + list(SERVICE_SETTINGS.values())  # fmt: skip
    return set().union(*(env_names(cls) for cls in classes))


def resolved(value: Any) -> str:
    """A compose value with `${VAR:-default}` as its default and `${VAR:?message}` as 'required'."""
    return INTERPOLATION.sub(lambda m: "required" if m.group(2) == "?" else (m.group(3) or ""), str(value))


def cbir_env(service: dict[str, Any]) -> dict[str, str]:
    return {name: resolved(value) for name, value in service.get("environment", {}).items() if name.startswith("CBIR_")}


def test_compose_sets_only_variables_the_settings_classes_read(compose: dict[str, Any]) -> None:
    known = known_env_names()
    assert "CBIR_ES_URL" in known and "CBIR_EMBEDDER_URL" in known
    for name, service in compose["services"].items():
        unknown = set(cbir_env(service)) - known
        assert not unknown, f"{name} sets {sorted(unknown)}, which no settings class reads"


@pytest.mark.parametrize("service_name", sorted(SERVICE_SETTINGS))
def test_compose_environment_is_valid_for_each_service(compose: dict[str, Any], service_name: str) -> None:
    """Each service reads what it is given, and its settings class accepts the values."""
    settings_class = SERVICE_SETTINGS[service_name]
    env = cbir_env(compose["services"][service_name])
    assert set(env) <= env_names(settings_class), f"{service_name} does not read {set(env) - env_names(settings_class)}"
    prefix = settings_class.model_config["env_prefix"]
    fields = {name.removeprefix(prefix).lower(): value for name, value in env.items()}
    fields = {k: yaml.safe_load(v) if k in ("api_keys", "write_api_keys") else v for k, v in fields.items()}
    settings_class(_env_file=None, **fields)  # type: ignore[call-arg]


def test_compose_search_is_published_on_8000_and_embedder_stays_internal(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "8000:8000" in [str(port) for port in services["search"]["ports"]]
    assert "ports" not in services["embedder"] and "8001" in [str(p) for p in services["embedder"]["expose"]]
    assert services["search"]["command"] == ["cbir", "gateway", "--host", "0.0.0.0", "--port", "8000"]
    assert services["embedder"]["command"] == ["cbir", "embedder", "--host", "0.0.0.0", "--port", "8001"]
    assert services["indexer"]["command"][:2] == ["cbir", "index"]


def test_compose_healthchecks_probe_the_right_endpoints(compose: dict[str, Any]) -> None:
    services = compose["services"]
    probes = {name: " ".join(services[name]["healthcheck"]["test"]) for name in ("elasticsearch", "embedder", "search")}
    assert "_cluster/health?wait_for_status=yellow" in probes["elasticsearch"]
    assert "http://localhost:8001/healthz" in probes["embedder"]
    assert "http://localhost:8000/healthz" in probes["search"]


def test_compose_start_order_waits_for_health_and_a_finished_index(compose: dict[str, Any]) -> None:
    services = compose["services"]
    conditions = {name: {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
                  for name in ("indexer", "search")}  # fmt: skip
    assert conditions["indexer"] == {"elasticsearch": "service_healthy", "embedder": "service_healthy"}
    assert conditions["search"] == {
        "elasticsearch": "service_healthy",
        "embedder": "service_healthy",
        "indexer": "service_completed_successfully",
    }
    assert services["indexer"]["restart"] == "no"


def test_compose_services_reach_each_other_by_service_name(compose: dict[str, Any]) -> None:
    for name in ("indexer", "search"):
        env = cbir_env(compose["services"][name])
        assert env["CBIR_BACKEND"] == "elasticsearch"
        assert env["CBIR_ES_URL"] == "http://elasticsearch:9200"
        assert env["CBIR_EMBEDDER_URL"] == "http://embedder:8001"
        assert env["CBIR_DATA_DIR"] == "/data/cifar10"
        volume = compose["services"][name]["volumes"][0]
        assert volume.startswith("${CBIR_DATA_HOST_DIR:?") and volume.endswith(":/data/cifar10:ro")


def test_compose_index_layout_defaults_match_the_store_settings(compose: dict[str, Any]) -> None:
    """30 shards and 0 replicas come from CBIR_ES_SHARDS / CBIR_ES_REPLICAS, defaulting as the settings do."""
    defaults = StoreSettings.model_fields
    assert defaults["es_shards"].default == 30 and defaults["es_replicas"].default == 0
    env = cbir_env(compose["services"]["indexer"])
    assert int(env["CBIR_ES_SHARDS"]) == defaults["es_shards"].default
    assert int(env["CBIR_ES_REPLICAS"]) == defaults["es_replicas"].default


def test_compose_elasticsearch_is_a_pinned_single_node_8x(compose: dict[str, Any]) -> None:
    es = compose["services"]["elasticsearch"]
    image, tag = es["image"].rsplit(":", 1)
    assert image == "docker.elastic.co/elasticsearch/elasticsearch"
    assert re.fullmatch(r"8\.\d+\.\d+", tag), f"pin an exact 8.x version, not {tag!r}"
    # 8.17.0-8.19.12 images silently drop dotted environment variables (elastic/elasticsearch#142676),
    # fixed in 8.19.13 (#143172): pin one at or after the fix.
    assert tuple(map(int, tag.split("."))) >= (8, 19, 13), f"{tag} is inside the dotted-variable bug's range"
    assert re.search(r"-Xms(\d+[gm]) -Xmx\1", es["environment"]["ES_JAVA_OPTS"]), "heap: -Xms equal to -Xmx"
    assert any(v.startswith("./deploy/elasticsearch.yml:") for v in es["volumes"])
    assert "es-data" in compose["volumes"]


def test_compose_elasticsearch_node_settings_live_in_its_config_file_not_the_environment(
    compose: dict[str, Any],
) -> None:
    """No environment quirk can drop them: every node setting (a dotted name) is in deploy/elasticsearch.yml."""
    environment = compose["services"]["elasticsearch"]["environment"]
    assert [name for name in environment if "." in name] == [], "move node settings to deploy/elasticsearch.yml"
    node = yaml.safe_load((REPO_ROOT / "deploy" / "elasticsearch.yml").read_text())
    assert node["discovery.type"] == "single-node"  # or the bootstrap checks apply to 0.0.0.0
    assert node["xpack.security.enabled"] is False  # or security auto-configures and http:// clients fail
    assert node["network.host"] == "0.0.0.0"
    probe = " ".join(compose["services"]["elasticsearch"]["healthcheck"]["test"])
    assert "http://localhost:9200/" in probe  # plain HTTP, which needs security off


def test_compose_gpu_override_reserves_an_nvidia_gpu_for_the_embedder() -> None:
    embedder = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]["embedder"]
    (device,) = embedder["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert embedder["environment"]["CBIR_DEVICE"] == "cuda"
    assert "CBIR_DEVICE" in env_names(EmbedderSettings)


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags (`!reset`, `!override`) read as the values they tag."""


for tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(tag, lambda loader, node: (
        loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_scalar(node)))


def dockerfile_stages() -> dict[str, tuple[str, list[str]]]:
    """deploy/Dockerfile's stages: name -> (the stage it is built FROM, its instructions)."""
    stages: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in (REPO_ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            _, parent, _, name = line.split()
            stages[name] = (parent, current := [])
        elif line and not line.startswith((" ", "#")) and stages:
            current.append(line)
    return stages


def stage_chain(target: str) -> list[str]:
    """The instructions that build `target`, its ancestors' first."""
    stages = dockerfile_stages()
    chain: list[str] = []
    while target in stages:
        target, lines = stages[target]
        chain = lines + chain
    assert target == "${BASE_IMAGE}", f"the stages start from the BASE_IMAGE argument, not {target}"
    return chain


@pytest.mark.parametrize("service_name", ["embedder", "indexer", "search"])
def test_compose_images_run_as_non_root_from_the_base_image_argument(compose: dict[str, Any],
                                                                      service_name: str) -> None:
    build = compose["services"][service_name]["build"]
    assert build["dockerfile"] == "deploy/Dockerfile" and build["context"] == "."
    chain = stage_chain(build["target"])
    users = [line.split(maxsplit=1)[1] for line in chain if line.startswith("USER ")]
    assert users, f"{build['target']} never leaves root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "RUN pip install --no-deps ." in chain
    assert "ARG BASE_IMAGE=python:3.11-slim" in (REPO_ROOT / "deploy" / "Dockerfile").read_text()


def test_compose_images_pin_the_dependencies_pyproject_names(compose: dict[str, Any]) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    required = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    lock_lines = [line for line in (REPO_ROOT / "deploy" / "requirements.lock").read_text().splitlines()
                  if line and not line.startswith("#")]  # fmt: skip
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.]+", line) for line in lock_lines), "only exact pins"
    locked = {line.split("==")[0] for line in lock_lines}
    torch_pins = {dep.split("==")[0]: dep.split("==")[1] for dep in project["dependencies"] if dep.startswith("torch")}
    assert required - locked == set(torch_pins)  # torch comes from the device's own index
    targets = {name: compose["services"][name]["build"]["target"] for name in ("embedder", "indexer", "search")}
    embedder = stage_chain(targets["embedder"])
    assert f"ARG TORCH_VERSION={torch_pins['torch']}" in embedder
    assert f"ARG TORCHVISION_VERSION={torch_pins['torchvision']}" in embedder
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in embedder  # a user's default: CPU wheels
    assert "COPY models/vgg16-cifar10 models/vgg16-cifar10" in embedder
    for name in ("search", "indexer"):  # embed over HTTP: no torch, no model (tests/compose checks the images)
        chain = stage_chain(targets[name])
        assert not [line for line in chain if "torch" in line.lower() or "models/" in line], name


def test_compose_builds_with_the_users_defaults_and_the_test_stack_stays_on_loopback(compose: dict[str, Any]) -> None:
    """The shipped file builds with the Dockerfile's defaults and keeps its own network; the test's override puts
    every build and container on the host's network, every service on 127.0.0.1."""
    for name, service in compose["services"].items():
        assert "network_mode" not in service, name
        assert set(service.get("build", {})) <= {"context", "dockerfile", "target"}, name
    override = yaml.load((REPO_ROOT / "tests" / "compose" / "compose.test.yml").read_text(), Loader=ComposeLoader)
    assert set(override["services"]) == set(compose["services"])
    for name, service in override["services"].items():
        assert service["network_mode"] == "host", name
        command = " ".join(service.get("command", []))
        assert "0.0.0.0" not in command and ("--host" not in command or "--host 127.0.0.1" in command), name
        urls = [value for key, value in service.get("environment", {}).items() if key.endswith("_URL")]
        assert all(url.startswith("http://127.0.0.1:") for url in urls), (name, urls)
        if "build" in compose["services"][name]:
            assert service["build"]["network"] == "host", name


def test_compose_build_context_leaves_out_state_data_and_secrets() -> None:
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".env", "state/", "data/", "runs/", ".pytest_cache/"} <= ignored
    assert not {"models/", "services/", "deploy/"} & ignored


def test_compose_rebuild_profile_builds_beside_the_served_index_and_shares_the_uploads(compose: dict[str, Any]) -> None:
    """docs/collections.md, "A new model without downtime": a second embedder runs the new bundle, a one-shot job
    rebuilds beside the served index through it (and promotes with the same image), and it sees the gateway's
    uploads."""
    services = compose["services"]
    nxt, job, search = services["embedder-next"], services["indexer-next"], services["search"]
    assert nxt["profiles"] == job["profiles"] == ["rebuild"] and "ports" not in nxt
    assert cbir_env(nxt)["CBIR_MODEL_DIR"] == "/models/next" and nxt["volumes"][0].endswith(":/models/next:ro")
    assert job["command"] == ["cbir", "index", "--rebuild", "--no-progress"]
    assert cbir_env(job)["CBIR_EMBEDDER_URL"] == "http://embedder-next:8001"
    assert cbir_env(job)["CBIR_STATE_DIR"] == cbir_env(search)["CBIR_STATE_DIR"] == "/state"
    assert "state:/state" in job["volumes"] and "state:/state" in search["volumes"] and "state" in compose["volumes"]
    assert cbir_env(services["embedder"])["CBIR_MODEL_DIR"] == "/models/current"
    # The stack publishes 8000 on every interface: writes need a key there, none is configured by default.
    assert resolved(search["environment"]["CBIR_WRITE_API_KEYS"]) == "[]"
