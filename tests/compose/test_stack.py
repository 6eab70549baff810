"""The compose stack built and run for real: the images built by Docker on this machine, the stack started with
the commands the documents give a user, searched, written to, switched to a new model with the `rebuild` profile,
and taken down.

The commands are read from the documents and run as written (README.md's compose lines, docs/collections.md's
rollover), the placeholders filled in, with `COMPOSE_FILE` adding tests/compose/compose.test.yml: the Elasticsearch
double in place of Elasticsearch, every container and build on the host's network on loopback ports.

Needs a Docker engine, the compose plugin and the local base image (tests/compose/prepare_docker.sh, which
.ci/run runs): without them the tests skip, except under CI (`CI` set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin

import httpx
import pytest
from factories import copy_collection
from processes import free_port

from services.common.collection import REPO_ROOT

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(3000)]

OVERRIDE = "tests/compose/compose.test.yml"
PROJECT = "cbir-test"  # not `cbir`, the shipped file's name: a user's own stack on this machine is left alone
BASE_IMAGE = "cbir-base:bookworm"  # Debian bookworm with Python 3.11, made by prepare_docker.sh
PREPARE = "tests/compose/prepare_docker.sh"
WRITE_KEY = "compose-test-write-key"
TRAIN_PER_CLASS = 10  # the indexer's collection: 100 images
UP_TIMEOUT_S = 1500.0  # `up --build` on a machine with nothing cached: builds (torch's wheels from PyPI) and start
COMMAND_TIMEOUT_S = 600.0
T = TypeVar("T")


def docker_problem() -> str | None:
    """Why the compose tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker command"
    checks = {"the Docker engine": ["docker", "info", "--format", "{{.ServerVersion}}"],
              "the compose plugin": ["docker", "compose", "version"],
              f"the base image {BASE_IMAGE}": ["docker", "image", "inspect", BASE_IMAGE]}
    for what, argv in checks.items():
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return f"{what} did not answer `{' '.join(argv)}` in 60 s"
        if result.returncode != 0:
            return f"{what} is missing: `{' '.join(argv)}` said {result.stderr.strip()[-300:]!r}"
    return None


def require_docker() -> None:
    problem = docker_problem()
    if problem is not None:
        reason = f"the compose tests need Docker: {problem}; `sudo {PREPARE}` installs and starts what is missing"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}. CI must run them, and .ci/run prepares Docker")
        pytest.skip(reason)


def documented_lines(document: Path) -> list[str]:
    """The lines of `document`'s bash blocks that run docker compose or export what it reads, as written."""
    lines, in_bash = [], False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
        elif in_bash and ("docker compose" in line or line.startswith("export CBIR_")):
            lines.append(line)
    return lines


def expand(word: str, env: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` replaced by the shell's value, as bash expands them (empty when unset)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), word)


def wait_until(check: Callable[[], T | None], *, timeout_s: float, what: str, interval_s: float = 1.0,
               process: subprocess.Popen | None = None) -> T:
    """Poll `check` until it returns something other than None; fail after `timeout_s`, or once `process` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result is not None:
            return result
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: `{shlex.join(process.args)}` exited with {process.returncode} first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


@dataclass
class ComposeStack:
    """The test's stack: the shell environment the documented commands run in, and what they started."""

    env: dict[str, str] = field(repr=False)  # this process's environment: kept out of failure reports
    placeholders: dict[str, str]
    gateway: str
    logs_dir: Path
    up: subprocess.Popen | None = field(default=None, repr=False)
    ran: list[str] = field(default_factory=list)

    def command(self, line: str, **placeholders: str) -> tuple[dict[str, str], list[str]]:
        """A documented line as bash would run it: `export A=1 B=2` changes the shell's environment; `A=1 cmd ...`
        runs cmd with A set; placeholders such as /path/to/cifar10 are filled in first."""
        for placeholder, value in {**self.placeholders, **placeholders}.items():
            line = line.replace(placeholder, value)
        self.ran.append(line)
        words = [expand(word, self.env) for word in shlex.split(line, comments=True)]
        if words[0] == "export":
            self.env.update(word.split("=", 1) for word in words[1:])  # type: ignore[misc]
            return self.env, []
        env = dict(self.env)
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        assert words[:2] == ["docker", "compose"], f"not a docker compose command: {line}"
        return env, words

    def run(self, line: str, *, timeout_s: float = COMMAND_TIMEOUT_S, **placeholders: str) -> str:
        """Run a documented line to its end; its output (stdout and stderr), or a failure that shows it."""
        env, argv = self.command(line, **placeholders)
        if not argv:
            return ""
        try:
            result = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"`{line}` did not finish in {timeout_s:.0f} s:\n{exc.output}\n{exc.stderr}") from exc
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"`{line}` exited with {result.returncode}:\n{output[-6000:]}"
        return output

    def start(self, line: str) -> subprocess.Popen:
        """Start a documented line that runs until stopped (`up` in the foreground), its output in a log file."""
        env, argv = self.command(line)
        with (self.logs_dir / "up.log").open("wb") as log:
            self.up = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self.up

    def containers(self) -> list[dict[str, str]]:
        """Every container of the project, of any profile, running or not (what `docker ps -a` shows)."""
        result = subprocess.run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                                 "--format", "{{json .}}"], capture_output=True, text=True, timeout=60, check=True)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def state(self, service: str) -> dict:
        """`docker inspect`'s State of the service's container."""
        result = subprocess.run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                                 "--filter", f"label=com.docker.compose.service={service}"], capture_output=True,
                                text=True, timeout=60, check=True)
        ids = result.stdout.split()
        assert len(ids) == 1, f"{len(ids)} containers of {service}: {[c['Names'] for c in self.containers()]}"
        result = subprocess.run(["docker", "inspect", "--format", "{{json .State}}", ids[0]], capture_output=True,
                                text=True, timeout=60, check=True)
        return json.loads(result.stdout)

    def healthy(self, service: str) -> bool | None:
        """True once Docker's healthcheck calls the service's container healthy, else None (for `wait_until`)."""
        return True if self.state(service).get("Health", {}).get("Status") == "healthy" else None

    def save_logs(self) -> str:
        """Each container's log in logs_dir, and the end of each (and of `up`'s output) for a failure report."""
        parts = [f"full logs: {self.logs_dir}"]
        up_log = self.logs_dir / "up.log"
        if up_log.exists():
            parts.append(f"--- docker compose up ---\n{up_log.read_text(errors='replace')[-3000:]}")
        try:
            containers = self.containers()
        except (subprocess.SubprocessError, OSError) as exc:
            return "\n".join([*parts, f"(docker ps failed: {exc})"])
        for container in containers:
            name = container["Names"]
            result = subprocess.run(["docker", "logs", "--timestamps", name], capture_output=True, text=True,
                                    timeout=60)
            text = result.stdout + result.stderr
            (self.logs_dir / f"{name}.log").write_text(text)
            parts.append(f"--- {name} ({container['Status']}) ---\n{text[-3000:]}")
        return "\n".join(parts)


def readable_by_all(root: Path) -> None:
    """The containers run as a user of their own (uid 10001): what they mount must be readable by anyone."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def gateway_ready(url: str, model_version: str | None = None) -> dict | None:
    """The gateway's /healthz when it is ready (with that model, if given), else None."""
    try:
        health = httpx.get(f"{url}/healthz", timeout=5)
    except httpx.TransportError:
        return None
    body = health.json() if health.headers.get("content-type") == "application/json" else {}
    if health.status_code == 200 and body.get("status") == "ready" and model_version in (None, body["model_version"]):
        return body
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cifar10_dir: Path, tiny_bundle_dir: Path) -> Iterator[ComposeStack]:
    """The stack started by README.md's `up --build` line (in the foreground, as typed) and ready; taken down by its
    `down -v` line afterwards, whatever happened."""
    require_docker()
    work = tmp_path_factory.mktemp("compose")
    collection = copy_collection(cifar10_dir, work / "cifar10", train=TRAIN_PER_CLASS, test=2)
    next_bundle = shutil.copytree(tiny_bundle_dir, work / "next-bundle")  # the new model of the rollover
    readable_by_all(collection)
    readable_by_all(next_bundle)
    logs_dir = work / "logs"
    logs_dir.mkdir()
    (work / "empty.env").write_text("")
    ports = {name: str(free_port()) for name in ("ES", "EMBEDDER", "NEXT", "GATEWAY")}
    env = {name: value for name, value in os.environ.items() if not name.startswith(("CBIR_", "COMPOSE_"))}
    env.update({f"CBIR_TEST_{name}_PORT": port for name, port in ports.items()},
               COMPOSE_FILE=f"docker-compose.yml:{OVERRIDE}", COMPOSE_PROJECT_NAME=PROJECT,
               COMPOSE_ENV_FILES=str(work / "empty.env"),  # not the repository's .env, if a developer has one
               CBIR_TEST_BASE_IMAGE=BASE_IMAGE, CBIR_TEST_EXTRA_CA_CERT=extra_ca_certificates(),
               CBIR_WRITE_API_KEYS=json.dumps([WRITE_KEY]))
    placeholders = {"/path/to/cifar10": str(collection), "/path/to/new-bundle": str(next_bundle)}
    stack = ComposeStack(env=env, placeholders=placeholders, gateway=f"http://127.0.0.1:{ports['GATEWAY']}",
                         logs_dir=logs_dir)
    up_line, down_line = readme_lines()
    stack.run(down_line, timeout_s=300)  # whatever a run that was killed left
    try:
        up = stack.start(up_line)
        try:
            wait_until(lambda: gateway_ready(stack.gateway), timeout_s=UP_TIMEOUT_S, process=up,
                       what=f"`{up_line}`: the gateway ready at {stack.gateway}")
            wait_until(lambda: stack.healthy("search"), timeout_s=60, process=up,
                       what="the gateway's container healthy")
        except AssertionError as exc:
            pytest.fail(f"{exc}\n{stack.save_logs()}")
        yield stack
    finally:
        try:
            stack.run(down_line, timeout_s=300)
        finally:
            if stack.up is not None:
                try:
                    stack.up.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    stack.up.kill()
                    stack.up.wait(timeout=30)


def extra_ca_certificates() -> str:
    """The certificates this machine trusts besides Debian's (Debian's place for local ones): the images' builds
    reach PyPI through the same network as this machine. Empty where there are none."""
    local = Path("/usr/local/share/ca-certificates")
    return "\n".join(path.read_text().strip() for path in sorted(local.rglob("*.crt"))) if local.is_dir() else ""


def readme_lines() -> tuple[str, str]:
    """README.md's two compose lines: the stack up (built), and down with its volumes."""
    lines = documented_lines(REPO_ROOT / "README.md")
    ups = [line for line in lines if " up --build" in line]
    downs = [line for line in lines if " down -v" in line]  # with the rebuild profile: embedder-next's container too
    assert len(ups) == len(downs) == 1 and len(lines) == 2, f"README.md's compose lines changed: {lines}"
    return ups[0], downs[0]


def test_the_readme_starts_the_stack_in_order_and_the_indexer_fills_the_index(stack: ComposeStack) -> None:
    for service in ("elasticsearch", "embedder", "search"):
        state = stack.state(service)
        assert state["Status"] == "running" and state["Health"]["Status"] == "healthy", (service, state)
    indexer = stack.state("indexer")
    assert indexer["Status"] == "exited" and indexer["ExitCode"] == 0, indexer
    collection = httpx.get(f"{stack.gateway}/collection", timeout=30).json()
    assert collection["documents"] == 10 * TRAIN_PER_CLASS and collection["backend"] == "elasticsearch"
    assert collection["status"] == "ready" and sum(collection["labels"].values()) == 10 * TRAIN_PER_CLASS


def test_search_answers_ranked_hits_through_the_published_port(stack: ComposeStack, cifar10_dir: Path) -> None:
    query = (cifar10_dir / "test" / "cat" / "0000.jpg").read_bytes()
    answer = httpx.post(f"{stack.gateway}/search", params={"k": 5}, timeout=60,
                        files={"file": ("cat.jpg", query, "image/jpeg")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    scores = [hit["score"] for hit in body["hits"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0.0 <= scores[-1] <= scores[0] <= 2.0
    assert body["query"]["predicted_label"] in {path.name for path in (cifar10_dir / "train").iterdir()}
    image = httpx.get(urljoin(stack.gateway, body["hits"][0]["image_url"]), timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_the_api_docs_load_with_their_assets(stack: ComposeStack) -> None:
    page = httpx.get(f"{stack.gateway}/docs", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r"""(?:src|href)=['"](/[^'"]+)['"]""", page.text)
    assert any(asset.endswith(".js") for asset in assets), page.text[:2000]
    for asset in assets:  # served by the gateway itself: nothing from the internet
        assert httpx.get(urljoin(stack.gateway, asset), timeout=30).status_code == 200, asset
    assert httpx.get(f"{stack.gateway}/openapi.json", timeout=30).json()["paths"]["/search"]


def test_writes_need_the_configured_key(stack: ComposeStack, cifar10_dir: Path) -> None:
    upload = {"file": ("dog.jpg", (cifar10_dir / "test" / "dog" / "0007.jpg").read_bytes(), "image/jpeg")}
    refused = httpx.post(f"{stack.gateway}/images", files=upload, data={"label": "dog"}, timeout=60)
    assert refused.status_code == 401, refused.text
    added = httpx.post(f"{stack.gateway}/images", files=upload, data={"label": "dog"}, timeout=60,
                       headers={"X-API-Key": WRITE_KEY})
    assert added.status_code == 201, added.text
    meta = httpx.get(f"{stack.gateway}/images/{added.json()['id']}/meta", timeout=30).json()
    assert meta["source"] == "upload" and meta["label"] == "dog"
    gone = httpx.delete(f"{stack.gateway}/images/{added.json()['id']}", headers={"X-API-Key": WRITE_KEY}, timeout=60)
    assert gone.status_code == 204, gone.text


@pytest.mark.parametrize("image", ["cbir-search:local", "cbir-indexer:local"])
def test_the_gateway_and_indexer_images_carry_no_torch(stack: ComposeStack, image: str) -> None:
    """They embed through the embedder: their images have neither torch nor any CUDA library."""
    probe = "import json, importlib.metadata as m; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    result = subprocess.run(["docker", "run", "--rm", "--network", "none", image, "python", "-c", probe],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    installed = {name.lower() for name in json.loads(result.stdout)}
    assert "cbir" in installed and "fastapi" in installed
    assert not {name for name in installed if name.startswith(("torch", "nvidia", "triton", "cuda"))}, installed


@dataclass
class SearchWatch:
    """Searches the gateway from a thread, one after another, until stopped (and at most `limit_s`): each answer
    with the phase of the rollover it was asked in."""

    url: str
    query: bytes
    limit_s: float = 1200.0
    phase: str = "building"
    answers: list[tuple[str, str, str | None]] = field(default_factory=list)  # phase, status or error, model or why
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> SearchWatch:
        self._thread = threading.Thread(target=self._search, name="search-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _search(self) -> None:
        deadline = time.monotonic() + self.limit_s
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                phase = self.phase
                try:
                    answer = client.post(f"{self.url}/search", params={"k": 3},
                                         files={"file": ("q.jpg", self.query, "image/jpeg")})
                    body = answer.json()
                    said = body["model_version"] if answer.status_code == 200 else body.get("detail")
                    self.answers.append((phase, str(answer.status_code), said))
                except httpx.TransportError as exc:
                    self.answers.append((phase, type(exc).__name__, str(exc)))
                self._stop.wait(0.25)

    def seen(self, phase: str) -> set[tuple[str, str | None]]:
        """The different answers of `phase`."""
        return {(status, said) for asked, status, said in self.answers if asked == phase}

    def count(self, phase: str) -> int:
        return sum(asked == phase for asked, _, _ in self.answers)


def test_the_rebuild_profile_switches_models_and_no_search_fails_while_the_new_index_is_built(
        stack: ComposeStack, cifar10_dir: Path) -> None:
    """docs/collections.md's commands, as written: the old model answers every search while the new index is built;
    after `cbir promote` the old gateway answers as before or 409 (never one model's index for the other's query);
    the restart of the embedder and the gateway with the new bundle is a short outage (503 or no connection, never
    a 500); from then on the new model serves the new index, with the upload made meanwhile carried over."""
    lines = documented_lines(REPO_ROOT / "docs" / "collections.md")
    assert len(lines) == 6 and lines[0].startswith("export CBIR_DATA_HOST_DIR="), lines
    export, embedder_next, rebuild, promote, restart, stop = lines
    old = gateway_ready(stack.gateway)
    assert old is not None
    query = (cifar10_dir / "test" / "ship" / "0001.jpg").read_bytes()
    upload = {"file": ("frog.jpg", (cifar10_dir / "test" / "frog" / "0003.jpg").read_bytes(), "image/jpeg")}
    with SearchWatch(stack.gateway, query) as watch:
        stack.run(export)
        stack.run(embedder_next)
        built = stack.run(rebuild)
        added = httpx.post(f"{stack.gateway}/images", files=upload, data={"label": "frog"}, timeout=60,
                           headers={"X-API-Key": WRITE_KEY})
        assert added.status_code == 201, added.text
        versions = re.findall(r"serve it with `cbir promote ([\w.-]+)`", built)
        assert len(versions) == 1 and versions[0] != old["model_version"], built[-3000:]
        new_version = versions[0]
        watch.phase = "promoted"
        stack.run(promote, **{"<new version>": new_version})
        watch.phase = "restarting"
        stack.run(restart)
        wait_until(lambda: gateway_ready(stack.gateway, new_version), timeout_s=300,
                   what=f"the gateway ready with {new_version}")
        watch.phase = "new"
        wait_until(lambda: watch.count("new") >= 3 or None, timeout_s=60, what="searches with the new model")
        stack.run(stop)

    assert watch.count("building") >= 10, "too few searches to tell anything"
    building, promoted, new = watch.seen("building"), watch.seen("promoted"), watch.seen("new")
    assert building == {("200", old["model_version"])}, f"while the new index was built: {building}"
    assert {status for status, _ in promoted} <= {"200", "409"}, f"between promote and restart: {promoted}"
    assert {said for status, said in promoted if status == "200"} <= {old["model_version"]}, promoted
    restarting = watch.seen("restarting")
    assert {status for status, _ in restarting} <= {"200", "409", "503", "ConnectError", "RemoteProtocolError",
                                                    "ReadError"}, f"during the restart: {restarting}"
    assert {said for status, said in restarting if status == "200"} <= {old["model_version"], new_version}
    assert new == {("200", new_version)}, f"after the restart: {new}"
    meta = httpx.get(f"{stack.gateway}/images/{added.json()['id']}/meta", timeout=30).json()
    assert meta["model_version"] == new_version and meta["source"] == "upload", meta
    assert stack.state("embedder-next")["Status"] == "exited"


def test_the_readme_takes_the_stack_down_and_leaves_nothing(stack: ComposeStack) -> None:
    _, down_line = readme_lines()
    stack.run(down_line, timeout_s=300)
    assert stack.containers() == []
    for kind in ("volume", "network"):
        left = subprocess.run(["docker", kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.split()
        assert left == [], f"{kind}s left by `{down_line}`: {left}"
