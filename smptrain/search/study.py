"""The shared Optuna study of `smptrain-tune`: opened (or created) by whichever worker comes first, with each
worker's heartbeat on its running trial, and the trials of dead workers found and queued once more.

A worker records `host:pid` and a heartbeat on its trial; a trial whose worker's pid is gone on the same host, or
whose heartbeat is older than the grace period, is marked FAIL and queued again with its parameters, its slot and
its directory (the storage lets only one worker make that transition).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from smptrain.core.errors import UserError
from smptrain.search.slots import gone_from_this_host


def open_study(name: str, storage: str | None, study_dir: Path):
    """The study, created by whichever worker comes first. `storage`: None (a journal file in the study directory),
    a file path (a journal file, e.g. on a shared filesystem) or an Optuna RDB URL (`postgresql://user@host/db`
    needs the `postgres` extra: psycopg)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir.mkdir(parents=True, exist_ok=True)
    given = storage
    try:
        if storage is None or "://" not in storage:
            journal = Path(storage) if storage else study_dir / "study.journal"
            journal.parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(str(journal)))
        else:
            storage = rdb_storage(storage)
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    except Exception as error:  # a driver missing, a URL Optuna cannot open (server down, no such database), a path
        module = missing_module(error)
        if module is not None:
            raise UserError(missing_driver(given, module)) from None
        raise UserError(f"--storage {given!r} cannot be opened: {str(error).splitlines()[0][:200]}") from None


def missing_module(error: BaseException | None) -> str | None:
    """The module a failed import behind `error` lacked (Optuna wraps SQLAlchemy's in an ImportError of its own)."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            return error.name
        error = error.__cause__ or error.__context__
    return None


def rdb_storage(url: str, attempts: int = 8):
    """Optuna's RDBStorage of `url`. Workers started at once on an empty database all create Optuna's tables: on
    PostgreSQL one of them wins and the others fail on a duplicate key of the catalogue (2 of 3 fresh databases lost
    a worker so). The losers try again, and find the tables made."""
    import random

    from optuna.storages import RDBStorage

    for attempt in range(attempts):
        try:
            return RDBStorage(url)
        except Exception as error:
            if attempt == attempts - 1 or not is_creation_race(error):
                raise
            time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))


def is_creation_race(error: BaseException) -> bool:
    """Whether `error` is another worker creating the same tables, types or rows at the same moment."""
    while error is not None:
        text = str(error).lower()
        if any(words in text for words in ("duplicate key", "already exists", "uniqueviolation", "unique constraint")):
            return True
        error = error.__cause__ or error.__context__
    return False


def missing_driver(url: str, module: str | None) -> str:
    """The one sentence for a storage URL whose database driver is not installed."""
    if module in ("psycopg", "psycopg2"):
        fix = ("pip install 'smptrain[postgres]' (psycopg 3, which postgresql:// URLs use with SQLAlchemy 2.1; "
               "postgresql+psycopg2:// URLs need psycopg2-binary instead)")
    else:
        fix = f"install the Python package that provides {module!r}"
    return f"--storage {url!r} needs the database driver {module!r}, which is not installed: {fix}"


def is_stale(trial, grace: float) -> bool:
    if gone_from_this_host(str(trial.user_attrs.get("worker", ":"))):
        return True
    return time.time() - float(trial.user_attrs.get("heartbeat", time.time())) > grace


def recover_dead_trials(study, grace: float, say) -> None:
    """Mark the trials of dead workers FAIL and queue each once more with its parameters and slot; the storage lets
    only one worker make a given trial FAIL, so each is queued once."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, grace):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # another worker got there first
            continue
        study.enqueue_trial(trial.params, user_attrs={"slot": trial.user_attrs.get("slot"),
                                                      "retry_of": trial.number,
                                                      "directory": trial.user_attrs.get("directory"),
                                                      **({"values": trial.user_attrs["values"]}
                                                         if "values" in trial.user_attrs else {})})
        say(f"trial {trial.number} lost its worker ({trial.user_attrs.get('worker')}); queued again")


def fresh_slots(study) -> int:
    """How many slots have been handed out (retries reuse their slot)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if "retry_of" not in t.user_attrs
               and "slot" in t.user_attrs)


class Heartbeat:
    """Records, every `interval` seconds, that this worker is still running its trial."""

    def __init__(self, trial, interval: float):
        self.stop = threading.Event()

        def beat():
            while not self.stop.wait(interval):
                try:
                    trial.set_user_attr("heartbeat", time.time())
                except Exception:  # the trial was finished meanwhile
                    return

        self.thread = threading.Thread(target=beat, daemon=True, name="smptrain-heartbeat")
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
