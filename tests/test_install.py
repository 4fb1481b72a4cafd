"""The README's "Add ragcache to your own Django project", followed as a newcomer would.

The wheel built from this repository goes into a fresh virtual environment (its
dependencies come from the package index pip is configured with), ``django-admin
startproject mysite`` makes a host project, and the README's marked blocks
(``<!-- install:NAME -->`` before a fenced block) are applied to it as they are: the
docs and this test cannot drift apart. Then ``migrate``, ``check``, the README's "try
it" block (a miss, then a hit), its price block, a Celery worker with beat, and the hit
in ``ragcache_report --format json``.

Only two things differ from the README, both to keep the test private and quick: the
Redis is a private ``redis-server`` on a free port (the README's ``127.0.0.1:6379`` is
replaced by it), and beat sends the aggregation every 2 s instead of every 60 s.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from .conftest import PrivateRedis

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SNIPPET_RE = re.compile(r"<!-- install:([\w.]+) -->\n```python\n(.*?)```", re.S)
README_REDIS = "redis://127.0.0.1:6379/"
PROJECT = "mysite"


def readme_snippets() -> dict[str, str]:
    return dict(SNIPPET_RE.findall(README.read_text()))


def test_readme_install_blocks_are_marked_and_valid_python():
    """Fast guard (not slow): every block the install test applies is in the README and parses."""
    snippets = readme_snippets()
    assert set(snippets) == {"settings", "urls", "celery.py", "__init__.py", "try", "price"}
    for name, code in snippets.items():
        compile(code, f"README.md <install:{name}>", "exec")
    assert README_REDIS in snippets["settings"]  # the install test points this at its private server
    assert '"default"' in snippets["settings"]  # a complete CACHES: startproject writes none
    assert f'Celery("{PROJECT}")' in snippets["celery.py"]


# --- the slow part: a wheel, a fresh venv, a host project --------------------------------

def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a newcomer's shell: none of this repository's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAGCACHE_", "DJANGO_", "CELERY_", "PROMETHEUS_", "DATABASE_", "PYTEST_"))
           and k not in {"PYTHONPATH", "VIRTUAL_ENV", "REDIS_URL", "REDIS_CLUSTER_URL", "SECRET_KEY", "DEBUG"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(args: list, *, cwd: Path, env: dict, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def installed_venv(tmp_path_factory):
    """A fresh venv with the wheel of this checkout installed (one per test session)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    # A copy, so the build leaves no build/ or *.egg-info in the working tree.
    shutil.copytree(ROOT / "ragcache", source / "ragcache", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _clean_env(base / "venv")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", base / "dist", "./source"],
         cwd=base, env=env)
    wheels = list((base / "dist").glob("ragcache-*.whl"))
    assert len(wheels) == 1, wheels
    _run([sys.executable, "-m", "venv", base / "venv"], cwd=base, env=env)
    _run([base / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", wheels[0]], cwd=base, env=env)
    return base / "venv"


def _stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to the process group (a warm shutdown for Celery), then SIGKILL if needed."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        except ProcessLookupError:
            pass
    try:  # children (the prefork pool, embedded beat) that outlived the main process
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_readme_install_path(installed_venv, tmp_path):
    venv, snippets = installed_venv, readme_snippets()
    env = _clean_env(venv)
    python = venv / "bin" / "python"
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    worker = None
    try:
        # Installing the wheel brought Celery's Redis transport (kombu needs `packaging` and redis-py).
        _run([python, "-c", "import kombu.transport.redis, packaging, ragcache"], cwd=tmp_path, env=env)

        _run([venv / "bin" / "django-admin", "startproject", PROJECT], cwd=tmp_path, env=env)
        site = tmp_path / PROJECT
        package = site / PROJECT
        private = f"redis://127.0.0.1:{redis_server.port}/"
        settings = snippets["settings"].replace(README_REDIS, private)
        with (package / "settings.py").open("a") as out:
            out.write("\n# --- README: Add ragcache to your own Django project ---\n" + settings)
            out.write('\n# test only: aggregate every 2 s, not every minute\n'
                      'CELERY_BEAT_SCHEDULE["ragcache-aggregate-usage"]["schedule"] = 2.0\n')
        with (package / "urls.py").open("a") as out:
            out.write("\n" + snippets["urls"])
        (package / "celery.py").write_text(snippets["celery.py"])
        with (package / "__init__.py").open("a") as out:
            out.write(snippets["__init__.py"])

        manage = [python, site / "manage.py"]
        _run([*manage, "migrate", "--no-input"], cwd=site, env=env)
        _run([*manage, "check", "--fail-level", "WARNING"], cwd=site, env=env)

        tried = _run([*manage, "shell", "--no-imports", "-c", snippets["try"]], cwd=site, env=env)
        assert tried.splitlines()[-2:] == ["miss Paris.", "hit Paris."], tried
        _run([*manage, "shell", "--no-imports", "-c", snippets["price"]], cwd=site, env=env)

        log = (tmp_path / "celery.log").open("w")
        worker = subprocess.Popen(
            [venv / "bin" / "celery", "-A", PROJECT, "worker", "-B", "--concurrency", "1", "--loglevel", "INFO",
             "--schedule", tmp_path / "celerybeat-schedule"],
            cwd=site, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        totals: dict = {}
        while time.monotonic() < deadline:
            assert worker.poll() is None, "the Celery worker died:\n" + (tmp_path / "celery.log").read_text()
            report = json.loads(_run([*manage, "ragcache_report", "--format", "json", "--hours", "2"],
                                     cwd=site, env=env))
            totals = report["totals"]
            if totals["hits"]:
                break
            time.sleep(1)
        assert totals.get("hits") == 1, f"no aggregated hit within 90 s: {totals}\n" + \
            (tmp_path / "celery.log").read_text()[-4000:]
        assert totals["lookups"] == 2 and totals["misses"] == 1 and totals["stores"] == 1
        assert totals["tokens_avoided"] == 16  # 14 prompt + 2 completion tokens
        # 14 * 0.00015 / 1000 + 2 * 0.0006 / 1000: the README's price, applied by the aggregation
        assert Decimal(totals["cost_avoided"]) == Decimal("0.0000033")  # exact, not rounded to 6 places
        assert "ragcache.tasks.aggregate_usage" in (tmp_path / "celery.log").read_text()
    finally:
        if worker is not None:
            _stop_group(worker)
        redis_server.stop()
