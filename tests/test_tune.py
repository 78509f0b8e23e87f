"""Tuning: trials land in one study from several processes, divergence is recorded, best.json feeds grow."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from grow.cli import build_parser, cmd_grow
from grow.controller import GrowConfig
from grow.errors import GrowError
from grow.tune import TuneConfig, open_storage, run_study
from tests.helpers import ROOT

TRIAL_FLAGS = ["--dataset", "synthetic", "--budget-flops", "1M", "--train-subset", "2000", "--epochs-per-round", "1",
               "--max-rounds", "2", "--finetune-epochs", "0", "--device", "cpu"]


def base(tmp_path, **overrides):
    values = dict(dataset="synthetic", budget_macs=1_000_000, train_subset=2000, epochs_per_round=1, max_rounds=2,
                  finetune_epochs=0, device="cpu", out=str(tmp_path / "trials"))
    values.update(overrides)
    return GrowConfig(**values)


def finished(study):
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.trials if t.state in done]


def test_study_runs_resumes_and_writes_best(tmp_path):
    config = TuneConfig(base=base(tmp_path), trials=2, out=str(tmp_path), search=("tau",))
    study = run_study(config)
    assert len(finished(study)) == 2
    best = json.loads((tmp_path / "best.json").read_text())
    assert set(best["params"]) == {"lr", "kappa", "tau"} and 0 <= best["value"] <= 1
    assert (tmp_path / "study.journal").exists()
    again = run_study(config)
    assert len(finished(again)) == 4, "re-running the same command adds to the same study"


def test_best_json_feeds_grow(tmp_path):
    (tmp_path / "best.json").write_text(json.dumps({"params": {"lr": 0.0321, "kappa": 1.7, "tau": 0.8}}))
    args = build_parser().parse_args(["grow", *TRIAL_FLAGS, "--params", str(tmp_path / "best.json"),
                                      "--out", str(tmp_path / "run"), "--quiet"])
    assert cmd_grow(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["lr"], config["kappa"], config["tau"]) == (0.0321, 1.7, 0.8)


def test_diverging_trials_are_recorded_not_fatal(tmp_path):
    config = TuneConfig(base=base(tmp_path), trials=2, out=str(tmp_path), ranges={"lr": (1e5, 1e6)})
    with pytest.raises(GrowError, match="no trial"):
        run_study(config)
    study = optuna.load_study(study_name="grow", storage=open_storage(str(tmp_path / "study.journal")))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all("diverged" in t.user_attrs["reason"] for t in study.trials)


def test_bad_search_names_are_refused(tmp_path):
    with pytest.raises(GrowError, match="--search"):
        run_study(TuneConfig(base=base(tmp_path), out=str(tmp_path), search=("momentum",)))


def tune_process(storage: str, out: Path, trials: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "tune", *TRIAL_FLAGS, "--trials", str(trials), "--storage", storage,
         "--study-name", "shared", "--out", str(out), "--quiet"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_processes_then_a_third(storage: str, tmp_path: Path) -> None:
    procs = [tune_process(storage, tmp_path / f"w{i}") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    assert len(finished(study)) == 4 and len(study.trials) == 4
    assert all((tmp_path / f"w{i}" / "best.json").exists() for i in range(2))
    third = tune_process(storage, tmp_path / "w2", trials=1)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    assert len(optuna.load_study(study_name="shared", storage=open_storage(storage)).trials) == 5


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path):
    two_processes_then_a_third(f"sqlite:///{tmp_path / 'study.db'}", tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A real PostgreSQL server on loopback, in a temporary data folder, run as the postgres user."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' to talk to PostgreSQL")
    # pytest's tmp folders are private to root; the server's folder must belong to its own user
    home = Path(tempfile.mkdtemp(prefix="grow-pg-"))
    bin_dir, data, port = bins[-1], home / "data", _free_port()
    data.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(home, "postgres")
        shutil.chown(data, "postgres")

    def run(*cmd):
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        return subprocess.run(full, check=True, capture_output=True, text=True, timeout=120)

    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {data}", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


def test_two_processes_share_one_postgresql_study(postgres, tmp_path):
    two_processes_then_a_third(postgres, tmp_path)


@pytest.mark.slow
def test_workers_are_processes_sharing_the_journal(tmp_path):
    config = TuneConfig(base=base(tmp_path), trials=3, out=str(tmp_path), workers=2)
    study = run_study(config)
    assert len(finished(study)) == 3
    assert (tmp_path / "best.json").exists()
