"""``opd submit`` against a real Ray head (``ray start --head``), and the ``opd_*`` metrics in its Prometheus
export.

The head runs as ``ray start --head --block`` in its own process group and under its own ``--temp-dir``, with
every port chosen free. It is stopped by SIGTERM to that ``ray start`` process (which tears its node down) and
then SIGKILL to its process group: never ``ray stop``, which would stop every Ray on the machine (other test
sessions, the user's runs).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import requests
from conftest import tiny_overrides
from servers import (
    PROMETHEUS,
    VENV_BIN,
    clean_env,
    free_port,
    group_alive,
    prom_range,
    start,
    start_prometheus,
    stop_group,
    tail,
)

from opd.config import ConfigError, load_config
from opd.monitor.grafana import dashboard
from opd.submit import job_client, staged_config


def test_staging_makes_paths_absolute_and_ships_verifier_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text("def score(prompts, completions, **kw):\n"
                                           "    return [1.0] * len(prompts)\n")
    cfg = load_config(None, ["models.student=models/s", "run.output_dir=runs/x",
                             'verifiers.functions=[{name: exact_answer}, '
                             '{name: "my_reward.py:score", weight: 0.5}]'])
    stage = tmp_path / "stage"
    staged = staged_config(cfg, stage)
    assert (staged.models.student == str(tmp_path / "models" / "s")
            and staged.run.output_dir == str(tmp_path / "runs" / "x"))
    assert [v.name for v in staged.verifiers.functions] == ["exact_answer",
                                                             "opd_job/verifiers/1_my_reward.py:score"]
    assert (stage / "opd_job" / "verifiers" / "1_my_reward.py").is_file()
    missing = load_config(None, ['verifiers.functions=[{name: "nope.py:f"}]'])
    with pytest.raises(ConfigError, match=r"verifiers.functions.0.name: file 'nope.py' does not exist"):
        staged_config(missing, tmp_path / "stage2")


@pytest.fixture(scope="module")
def head():
    """A fresh Ray head with a dashboard (Job API) and a Prometheus metrics port; yields (dashboard url,
    metrics url, temp dir)."""
    temp = Path(tempfile.mkdtemp(prefix="opdray", dir="/tmp"))  # short: Ray's socket paths live under it
    dash, metrics = free_port(), free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--metrics-export-port": metrics,
             "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
           *[f"{k}={v}" for k, v in ports.items()]]
    log = temp / "ray-start.log"
    # PATH starts with the venv: job entrypoints run `python -m opd.cli`, which must be the venv's python.
    proc = start(cmd, log, clean_env())
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline, last = time.time() + 240, None
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{tail(log)}"
            assert time.time() < deadline, (f"Ray head's Job API not up after 240 s (last error: {last}):\n"
                                             f"{tail(log)}")
            try:
                job_client(url).list_jobs()
                break
            except Exception as e:  # not listening yet
                last = e
                time.sleep(2)
        yield url, f"http://127.0.0.1:{metrics}/metrics", temp
    finally:
        stop_group(proc)
        assert not group_alive(proc.pid), "the Ray head left processes behind"
        shutil.rmtree(temp, ignore_errors=True)


def _opd(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "opd.cli", *args], capture_output=True, text=True,
                       env={**clean_env(), **(env or {})}, timeout=300)
    return r.returncode, r.stdout, r.stderr


def _opd_metrics(metrics_url: str) -> set[str]:
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return set()
    return set(re.findall(r"^(\w*opd_\w+)\{[^}]*run=\"submitted\"", text, re.M))


@pytest.mark.slow
def test_submit_runs_job_and_exports_metrics(head, tiny_models, tmp_path):
    url, metrics_url, _ = head
    verifier = tmp_path / "digits.py"
    verifier.write_text(textwrap.dedent("""
        def has_digit(prompts, completions, **columns):
            return [float(any(c.isdigit() for c in text)) for text in completions]
    """))
    out = tmp_path / "submitted"
    # a plug-in file ships too
    verifiers = f'[{{name: exact_answer}}, {{name: "{verifier}:has_digit", weight: 0.1}}]'
    over = tiny_overrides(tiny_models, out, **{"verifiers.functions": verifiers, "trainer.total_steps": 8,
                                                "checkpoint.every": 4})
    env = {"RAY_ADDRESS": url}  # as Ray's own CLI: no --address needed
    rc, stdout, stderr = _opd("submit", _config_file(tmp_path), *over, "--wait", "--submission-id",
                              "submitted-1", env=env)
    job_id = stdout.splitlines()[0].strip()  # printed first; --wait then follows the logs to the end
    assert rc == 0 and job_id == "submitted-1", (f"job {job_id} did not succeed:\n{stdout[-4000:]}\n"
                                                 f"{stderr[-2000:]}")
    assert f"run directory: {out}" in stderr
    # The driver waits for one more metrics export before it exits on a cluster, so the final step is exported
    # even when the job is shorter than Ray's 10 s report interval; read at once, as the agent drops a
    # finished driver's series after a while.
    # Failures and restarts are exported from step 0 (as 0 here), not only after the first one.
    want = {"ray_opd_teacher_kl", "ray_opd_reward", "ray_opd_step", "ray_opd_rollout_tokens_per_s",
            "ray_opd_verifier_failures", "ray_opd_rollout_worker_restarts"}
    seen = set()
    for _ in range(10):
        seen |= _opd_metrics(metrics_url)
        if want <= seen:
            break
        time.sleep(2)
    assert want <= seen, f"opd metrics exported: {sorted(seen)}"
    rc, stdout, stderr = _opd("status", job_id, "--address", url)
    info = json.loads(stdout)
    assert rc == 0 and info["status"] == "SUCCEEDED" and info["name"] == "submitted", stderr
    assert info["run_dir"] == str(out) and info["last_step"]["step"] == 7
    rc, logs, _ = _opd("logs", job_id, "--address", url)
    assert rc == 0 and "student accuracy after" in logs
    # ends with the job; exits with its state
    rc, followed, _ = _opd("logs", job_id, "--address", url, "--follow")
    assert rc == 0 and "student accuracy after" in followed
    step_lines = [ln for ln in logs.splitlines() if ln.startswith("step ")]  # the job log is not a terminal
    assert len(step_lines) == 8 and step_lines[-1].startswith("step 8/8 | reward ")
    assert "eval before training | accuracy" in logs and "eval after training | accuracy" in logs
    rc, listing, _ = _opd("list", "--address", url)
    assert rc == 0 and "submitted-1  SUCCEEDED  submitted" in listing
    # the same run directory again
    rc, _, stderr = _opd("submit", _config_file(tmp_path), *over, "--address", url)
    assert rc == 2 and "already holds a run; pass --resume" in stderr  # refused here, before anything is sent
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8)) and all(r["teacher_kl"] is not None for r in rows)
    rc, stdout, _ = _opd("stop", job_id, "--address", url)
    assert rc == 0 and stdout.strip() == "not running"
    rc, _, stderr = _opd("status", "raysubmit_nosuchjob", "--address", url)
    assert rc == 1 and "raysubmit_nosuchjob" in stderr


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="needs the `prometheus` binary (Debian's prometheus package; "
                    "scripts/install.sh installs it when run as root)")
def test_prometheus_scrapes_each_role_and_every_grafana_query_finds_its_series(head, tiny_models, tmp_path):
    """A real Prometheus scrapes the head's metrics port (found through Ray's own service-discovery file)
    during a 5-step job: opd_reward and opd_teacher_kl come back for the job from PromQL; the rollout
    workers', learner's and teacher's series come from those actors' processes, not the driver's; every query
    of the Grafana dashboard returns data for the run."""
    url, _, temp = head
    targets = temp / "prom_metrics_service_discovery.json"
    assert targets.is_file(), (f"no Ray service-discovery file in {temp}: "
                               f"{sorted(p.name for p in temp.iterdir())}")
    prom, prom_url = start_prometheus(tmp_path, targets)
    try:
        out = tmp_path / "scraped"
        # an agent job (a user environment by path; the tiny template has no tool role), so the dashboard's
        # Agents row has data too
        env = f"{Path(__file__).parent / 'agent_envs.py'}:Counting"
        over = tiny_overrides(tiny_models, out, **{
            "trainer.total_steps": 5, "checkpoint.every": 0, "agent.environment": env, "agent.max_turns": 3,
            "agent.env_kwargs": "{role: user, note: '', answer_after: 2, system: false}",
            "rollout.max_model_len": 64})
        t0 = time.time()
        rc, stdout, stderr = _opd("submit", _config_file(tmp_path), *over, "--wait", "--address", url)
        assert rc == 0, f"{stdout[-3000:]}\n{stderr[-2000:]}"
        time.sleep(3)  # one more scrape after the driver's last export
        t1 = time.time()

        def series(query: str) -> list[dict]:
            return prom_range(prom_url, query, t0, t1)

        for name in ("ray_opd_reward", "ray_opd_teacher_kl"):
            got = series(f'{name}{{run="scraped"}}')
            assert got and all(len(s["values"]) for s in got), f"{name}: {got}"
        kl = [float(v) for s in series('ray_opd_teacher_kl{run="scraped"}') for _, v in s["values"]]
        assert all(x == x and x > -1e-6 for x in kl), kl  # a KL estimate: finite, not negative

        driver = {s["metric"]["WorkerId"] for s in series('ray_opd_step{run="scraped"}')}
        for name, replicas in (("rollout_worker_tokens", {"0"}), ("learner_tokens", {"0"}),
                               ("teacher_worker_tokens", {"default"}), ("verifier_rows", {"exact_answer"})):
            got = series(f'ray_opd_{name}{{run="scraped"}}')
            assert {s["metric"]["replica"] for s in got} == replicas, (name, got)
            if name != "verifier_rows":  # the verifier runner waits on its hosts' deadlines in the driver
                assert not {s["metric"]["WorkerId"] for s in got} & driver, f"{name} came from the driver"
            assert max(float(v) for s in got for _, v in s["values"]) > 0, (name, got)

        board = dashboard()
        queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
        assert len(queries) >= 20
        empty = [q for q in queries if not series(q.replace("$run", "scraped"))]
        assert not empty, f"Grafana queries with no data for the run: {empty}"
    finally:
        stop_group(prom, 10)


def _config_file(tmp_path: Path) -> str:
    path = tmp_path / "job.yaml"
    path.write_text("algorithm: opd\n")
    return str(path)
