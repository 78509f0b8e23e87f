"""Tune DessiLBI's kappa and lr (and the path speed mu, and tau) with Optuna.

Each trial is a short growth run scored on the validation split (never the test split). Each
growth round reports its validation accuracy, so a pruner can stop hopeless trials early. A
trial that diverges or cannot fit the budget ends pruned, with the reason in its user attributes,
and the study goes on.

Storage: by default an Optuna JournalStorage file in the output folder. It needs no server, and
Optuna's documentation recommends its journal file backend over SQLite when several processes on
one machine share a study (SQLite locks the whole database per write). Any URL Optuna accepts
(sqlite:///..., postgresql://...) works too; with PostgreSQL, many machines run the same `tune`
command against one database and share the study.
"""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import optuna
import torch

from grow.controller import GrowConfig, grow_network
from grow.errors import GrowError, mask_secrets
from grow.fileio import write_json
from grow.report import Reporter

# name -> (GrowConfig field, low, high, log scale). Why these ranges: DessiLBI's weight step is
# lr * kappa, and the defaults (lr 1.0, kappa 0.1) make it the usual 0.1 of SGD on small images;
# lr and kappa each range over a decade and more around them, kappa past the paper's 1 (it scales
# the pull towards Gamma and Gamma itself); the path speed (lr * steps / mu per round) from "Gamma
# barely moves in a round" to "everything is selected within a round"; tau from lenient to strict.
SEARCH_SPACE = {
    "lr": ("lr", 0.05, 3.0, True),
    "kappa": ("kappa", 0.03, 2.0, True),
    "mu": ("path_per_round", 0.5, 10.0, True),
    "tau": ("tau", 0.6, 1.0, False),
}
ALWAYS = ("lr", "kappa")
OBJECTIVES = ("accuracy", "macs")


@dataclass
class TuneConfig:
    """A study: the growth run each trial makes (`base`), how many trials, where results go."""

    base: GrowConfig
    trials: int = 20
    out: str = "runs/tune"
    storage: Optional[str] = None
    study_name: str = "grow"
    search: tuple[str, ...] = ()
    pruner: str = "median"
    objectives: tuple[str, ...] = ("accuracy",)
    sampler_seed: int = 0
    workers: int = 1
    ranges: dict = field(default_factory=dict)  # overrides of SEARCH_SPACE entries: name -> (low, high)

    def check(self) -> None:
        unknown = [s for s in self.search if s not in SEARCH_SPACE or s in ALWAYS]
        if unknown:
            raise GrowError(f"--search takes {', '.join(k for k in SEARCH_SPACE if k not in ALWAYS)}; got {', '.join(unknown)}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives or self.objectives[0] != "accuracy":
            raise GrowError(f"--objectives must be 'accuracy' or 'accuracy,macs', got {','.join(self.objectives)}")
        if self.pruner not in ("median", "hyperband", "none"):
            raise GrowError(f"--pruner must be median, hyperband or none, got {self.pruner}")
        if self.trials < 1 or self.workers < 1:
            raise GrowError("--trials and --workers must be at least 1")
        if not 0 <= self.sampler_seed < 2**32 - self.workers:  # numpy's range; worker w seeds with seed + w
            raise GrowError(f"--sampler-seed must be between 0 and {2**32 - 1 - self.workers}, got {self.sampler_seed}")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def storage_url(self) -> str:
        return self.storage or str(Path(self.out) / "study.journal")


def open_storage(url_or_path: str):
    """Optuna storage for a URL, or a journal file for a plain path; GrowError if it cannot open."""
    try:
        if "://" not in url_or_path:
            from optuna.storages.journal import JournalFileBackend
            Path(url_or_path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(url_or_path))
        return _open_rdb(url_or_path)
    except Exception as err:  # drivers raise their own types: one line for the user either way
        cause = err.__cause__ or err
        raise GrowError(f"cannot open Optuna storage {url_or_path!r}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


def _open_rdb(url: str, attempts: int = 6):
    """RDBStorage, retried: workers started together race to create Optuna's tables in an empty
    database, and all but one fail once; the retry finds the tables made."""
    # several writers on SQLite wait for the lock instead of failing with "database is locked"
    kwargs = {"engine_kwargs": {"connect_args": {"timeout": 120}}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1) + random.random())


def load_study(config: TuneConfig, worker: int = 0) -> optuna.Study:
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.base.max_rounds),
              "none": optuna.pruners.NopPruner()}[config.pruner]
    directions = ["maximize", "minimize"] if config.multi_objective else ["maximize"]
    return optuna.create_study(
        storage=open_storage(config.storage_url()), study_name=config.study_name, directions=directions,
        sampler=optuna.samplers.TPESampler(seed=config.sampler_seed + worker),
        pruner=optuna.pruners.NopPruner() if config.multi_objective else pruner, load_if_exists=True)


class _TrialReporter(Reporter):
    """Reports each round's validation accuracy to Optuna and stops the run when it should prune."""

    def __init__(self, trial: optuna.Trial, report: bool):
        self.trial, self.report = trial, report

    def round_end(self, record: dict, units: list) -> None:
        if not self.report:
            return
        self.trial.report(record["val_accuracy"], record["round"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"round {record['round']}: val accuracy {record['val_accuracy']:.4f}")


def suggest(trial: optuna.Trial, config: TuneConfig) -> dict:
    params = {}
    for name in (*ALWAYS, *config.search):
        field_name, low, high, log = SEARCH_SPACE[name]
        low, high = config.ranges.get(name, (low, high))
        params[field_name] = trial.suggest_float(field_name, low, high, log=log)
    return params


def objective(config: TuneConfig, trial: optuna.Trial):
    params = suggest(trial, config)
    out = Path(config.out) / "trials" / f"{config.study_name}-{trial.number:04d}"
    # A trial is scored on held-out validation images, so its fine-tune must not train on them.
    run = dataclasses.replace(config.base, out=str(out), finetune_on_val=False, **params)
    start = time.perf_counter()
    try:
        result = grow_network(run, _TrialReporter(trial, not config.multi_objective))
    except optuna.TrialPruned as err:
        trial.set_user_attr("reason", f"pruned by {config.pruner}: {err}")
        raise
    except GrowError as err:
        trial.set_user_attr("reason", str(err))
        raise optuna.TrialPruned(str(err)) from None
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    final = result.history["final"]
    trial.set_user_attr("macs", final["macs"])
    trial.set_user_attr("params", final["params"])
    trial.set_user_attr("seconds", time.perf_counter() - start)
    trial.set_user_attr("out", str(out))
    if config.multi_objective:
        return final["val_accuracy"], final["macs"]
    return final["val_accuracy"]


def _optimize(config: TuneConfig, trials: int, worker: int) -> None:
    study = load_study(config, worker)
    study.optimize(lambda t: objective(config, t), n_trials=trials, gc_after_trial=True,
                   catch=(RuntimeError, ValueError))


def _worker_main(config_dict: dict, trials: int, worker: int) -> None:
    base = GrowConfig.from_dict(config_dict.pop("base"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _optimize(TuneConfig(base=base, **config_dict), trials, worker)


def run_study(config: TuneConfig) -> optuna.Study:
    """Run `config.trials` more trials (split over `config.workers` processes) and write
    best.json (and pareto.json for two objectives) into `config.out`. Returns the study."""
    config.check()
    config.base.check()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if config.workers == 1:
        _optimize(config, config.trials, 0)
    else:
        shares = [config.trials // config.workers + (w < config.trials % config.workers) for w in range(config.workers)]
        data = dataclasses.asdict(config)
        data["base"] = config.base.to_dict()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(dict(data), n, w)) for w, n in enumerate(shares) if n]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise GrowError(f"{sum(1 for p in procs if p.exitcode)} tuning worker(s) failed; see their output above")
    study = load_study(config)
    write_results(study, config)
    return study


def best_trial(study: optuna.Study, config: TuneConfig) -> Optional[optuna.trial.FrozenTrial]:
    if config.multi_objective:
        front = study.best_trials
        return max(front, key=lambda t: t.values[0]) if front else None
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return max(done, key=lambda t: t.value) if done else None


def write_results(study: optuna.Study, config: TuneConfig) -> None:
    best = best_trial(study, config)
    if best is None:
        raise GrowError(f"no trial of study {config.study_name!r} finished; see the reasons with `tune` output above")
    write_json(Path(config.out) / "best.json", {
        "params": best.params, "value": best.values[0], "macs": best.user_attrs.get("macs"), "trial": best.number,
        "study": config.study_name, "storage": mask_secrets(config.storage_url()),
        "objectives": list(config.objectives)})
    if config.multi_objective:
        write_json(Path(config.out) / "pareto.json", [
            {"trial": t.number, "val_accuracy": t.values[0], "macs": t.values[1], "params": t.params}
            for t in sorted(study.best_trials, key=lambda t: t.values[1])])


def print_summary(study: optuna.Study, config: TuneConfig, console=None, top: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    from grow.report import human

    console = console or Console()
    names = [SEARCH_SPACE[n][0] for n in (*ALWAYS, *config.search)]
    table = Table(title=f"study {config.study_name!r}: {len(study.trials)} trials "
                        f"({'Pareto front, accuracy vs MACs' if config.multi_objective else 'best first'})",
                  title_justify="left")
    for col in ("trial", "state", "val acc", "MACs", *names, "note"):
        table.add_column(col, justify="left" if col in ("state", "note") else "right")
    trials = study.best_trials if config.multi_objective else sorted(
        study.trials, key=lambda t: (t.value is None, -(t.value or 0)))
    for t in trials[:top]:
        acc = t.values[0] if t.values else None
        table.add_row(str(t.number), t.state.name.lower(), "" if acc is None else f"{acc:.4f}",
                      human(t.user_attrs["macs"]) if "macs" in t.user_attrs else "",
                      *(f"{t.params[n]:.4g}" if n in t.params else "" for n in names),
                      t.user_attrs.get("reason", "")[:60])
    console.print(table)
    if config.multi_objective:
        console.print("Optuna's pruners do not apply to multi-objective studies: every trial ran to the end.")
    console.print(f"best parameters: {Path(config.out) / 'best.json'}; grow with them: "
                  f"python cli.py grow --params {Path(config.out) / 'best.json'} ...")
