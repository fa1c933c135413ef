"""docs/cluster.md's sbatch scripts under a real SLURM, and smptrain-tune's storage on a real PostgreSQL, both started
by the test session (`tests/cluster.py`).

The scripts are read from the page, so a recipe cannot drift from what is tested; `recipe()` changes only what a CPU
test must (the documented list in docs/cluster.md, "How these recipes are tested"): no GPU lines, one process, the
test's configuration and paths, and each test's array size and trial count. What the scheduler did is
printed (`-s` shows it): job states, restart counts, exit codes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cluster import Postgres, Slurm, missing
from helpers import ROOT, run, tiny_config
from test_train import assert_same_weights, logged_steps, val_records

pytestmark = pytest.mark.slow  # a real scheduler: jobs start, are signalled, requeued and started again

PAGE = ROOT / "docs" / "cluster.md"
ON_A_CPU = [  # what every recipe changes to run in a CPU test (docs/cluster.md lists the same)
    (r" ?--gres=gpu:\d+", ""), (r"--cpus-per-task=\d+", "--cpus-per-task=1"),
    (r"--multi_gpu --num_processes \d+", "--num_processes 1"), (r"^export MLFLOW_TRACKING_URI=.*$", ""),
]


def recipe(job_name: str, config: Path, changes: dict[str, str] | None = None, space: Path | None = None) -> str:
    """The sbatch script of docs/cluster.md whose `--job-name` is `job_name`, as a CPU test runs it."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), re.S)
    script = next(block for block in blocks if f"--job-name={job_name}" in block)
    for pattern, replacement in ON_A_CPU:
        script = re.sub(pattern, replacement, script, flags=re.M)
    script = script.replace("my.toml", str(config))
    if space is not None:
        script = script.replace("space.toml", str(space))
    for old, new in (changes or {}).items():
        assert old in script, f"{old!r} is no longer in the {job_name} recipe of docs/cluster.md"
        script = script.replace(old, new)
    return script


def job_env() -> dict:
    """A job's environment: a log file's progress (lines, every record), wandb offline, no test-only settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "TQDM_"))}
    return {**env, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "0", "OMP_NUM_THREADS": "1"}


def submit(slurm: Slurm, tmp_path: Path, name: str, script: str, *options: str) -> tuple[int, Path]:
    path = tmp_path / f"{name}.sh"
    path.write_text(script)
    out = tmp_path / f"{name}-%A_%a.out" if "--array" in script or any("--array" in o for o in options) \
        else tmp_path / f"{name}.out"
    job = slurm.sbatch(path, "-o", str(out), "--chdir", str(ROOT), *options, cwd=ROOT, env=job_env())
    return job, out


def said(what: str) -> None:
    print(f"\n[slurm] {what}", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing("slurm")
    if reason:
        pytest.skip(reason)
    cluster = Slurm(tmp_path_factory.mktemp("slurm")).start(cpus=2)
    said(f"SLURM {cluster.run('sinfo', '--version').stdout.strip()} started")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    reason = missing("postgres")
    if reason:
        pytest.skip(reason)
    server = Postgres().start()
    yield server
    server.stop()


def cv_config(tmp_path: Path, demo_dir: Path, folds: int, name: str = "cv.toml") -> Path:
    """A configuration whose `[darts]` table plans the CV (DARTS' n-folds and n-randoms: folds x seed 42), so that the
    documented commands run as written."""
    config = tiny_config(tmp_path, demo_dir, name=name, data={"subsample": 16, "total_folds": 2},
                         train={"max_epochs": 2, "threads": 1}, log={"preview_every_n_val": 0})
    config.write_text(config.read_text() + f"[darts]\nn-folds = {folds}\nn-randoms = 1\n")
    return config


def test_a_cv_array_two_at_a_time_with_a_task_cancelled_and_run_again_ends_as_a_sequential_cv(slurm, demo_dir,
                                                                                             tmp_path):
    config = cv_config(tmp_path, demo_dir, folds=2)
    run(["smptrain-cv", "--config", str(config), "--name", "sequential"], check=True)
    job, _ = submit(slurm, tmp_path, "cv", recipe("unet-cv", config, {"--array=0-14": "--array=0-1"}))
    runs = tmp_path / "artifacts" / "unet-cv"
    slurm.wait(lambda: all(t.get("JobState") == "RUNNING" for t in slurm.tasks(job).values())
               and len(slurm.tasks(job)) == 2, "both tasks running at once", 120)
    slurm.wait(lambda: logged_steps(runs / "unet-cv-f1s42") >= 2, "task 1 training", 120)
    slurm.run("scancel", f"{job}_1", check=True)
    slurm.wait(lambda: all(t.get("JobState") in ("COMPLETED", "CANCELLED", "FAILED") for t in slurm.tasks(job).values()),
               "the array's end", 240)
    states = {task: (f["JobState"], f["ExitCode"]) for task, f in slurm.tasks(job).items()}
    again, _ = submit(slurm, tmp_path, "cv-again", recipe("unet-cv", config, {"--array=0-14": "--array=1"}))
    slurm.wait(lambda: slurm.tasks(again).get(1, {}).get("JobState") in ("COMPLETED", "FAILED"), "the task run again",
               240)
    said(f"cv array {job}: {states}; task 1 run again as {again}: {slurm.tasks(again)[1]['JobState']}, exit "
         f"{slurm.tasks(again)[1]['ExitCode']}")
    assert states[0] == ("COMPLETED", "0:0") and states[1][0] == "CANCELLED"
    assert slurm.tasks(again)[1]["ExitCode"] == "0:0"
    sequential = json.loads((tmp_path / "artifacts" / "sequential" / "cv.json").read_text())
    array = json.loads((runs / "cv.json").read_text())
    assert array["status"] == "finished" and array["score"] == sequential["score"]
    assert array["summary"] == sequential["summary"] and array["runs"] == 2  # each run once, as run in sequence


SPACE = '[hyperparameters]\nlearning_rate = [1e-3, 3e-3]\n'


@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_tuning_workers_as_an_array_share_one_study(slurm, demo_dir, tmp_path, storage, request):
    """The documented tuning array, two workers at once, on a journal file and on PostgreSQL (the URL the docs give;
    a fresh database whose tables both workers race to create)."""
    config, space = cv_config(tmp_path, demo_dir, folds=1), tmp_path / "space.toml"
    space.write_text(SPACE)
    target = str(tmp_path / "s1.journal")
    if storage == "postgresql":
        target = request.getfixturevalue("postgres").fresh_database("s1")
    job, _ = submit(slurm, tmp_path, "tune", recipe("tune-s1", config, {"--array=0-15": "--array=0-1",
                                                                        "--trials 64": "--trials 2",
                                                                        "/shared/studies/s1.journal": target},
                                                    space=space))
    slurm.wait(lambda: len(slurm.tasks(job)) == 2 and all(t.get("JobState") in ("COMPLETED", "FAILED")
                                                          for t in slurm.tasks(job).values()), "the workers' end", 300)
    states = {task: (f["JobState"], f["ExitCode"]) for task, f in slurm.tasks(job).items()}
    said(f"tuning array {job} on {storage}: {states}")
    assert all(state == ("COMPLETED", "0:0") for state in states.values()), states
    import pandas as pd

    from smptrain.config import load_config
    from smptrain.search.space import plan, read_space

    trials = pd.read_csv(tmp_path / "artifacts" / "s1" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert sorted(done["slot"]) == [0, 1] and len(trials) == 2 and sorted(done["train.lr"]) == [1e-3, 3e-3]
    expected = plan(read_space(space, load_config(config)), "random", 2)  # slot k runs DARTS' k-th draw
    assert all(row["train.lr"] == expected[row["slot"]]["train.lr"] for _, row in done.iterrows())
    assert len(set(done["worker"])) >= 1 and all(isinstance(w, str) for w in done["worker"])


def test_the_recipes_array_compares_every_recipe(slurm, demo_dir, tmp_path):
    config = tiny_config(tmp_path, demo_dir, data={"subsample": 16}, train={"max_epochs": 1, "threads": 1},
                         log={"preview_every_n_val": 0})
    job, _ = submit(slurm, tmp_path, "recipes", recipe("recipes", config, {"--array=0-5": "--array=0-1",
                                                                           "--task": "--seeds 42 --task"}))
    slurm.wait(lambda: len(slurm.tasks(job)) == 2 and all(t.get("JobState") in ("COMPLETED", "FAILED")
                                                          for t in slurm.tasks(job).values()), "the array's end", 300)
    states = {task: (f["JobState"], f["ExitCode"]) for task, f in slurm.tasks(job).items()}
    said(f"recipes array {job}: {states}")
    assert all(state == ("COMPLETED", "0:0") for state in states.values()), states
    comparison = json.loads((tmp_path / "artifacts" / "recipes" / "comparison.json").read_text())
    assert comparison["status"] == "finished" and comparison["runs"] == 2 and not comparison["missing"]


# --- PostgreSQL alone ---------------------------------------------------------------------------------------------


WORKER = ("import sys; from pathlib import Path; from smptrain.search.study import open_study; "
          "study = open_study('s', sys.argv[1], Path(sys.argv[2])); print(study.study_name)")


def open_in_a_process(url: str, study_dir: str, results) -> None:
    """A worker's start: its own process (forked from one that imported Optuna once), its own connections."""
    from smptrain.core.errors import UserError
    from smptrain.search.study import open_study

    try:
        open_study("s", url, Path(study_dir))
        results.put(0)
    except UserError as error:
        results.put(str(error))


def test_workers_started_at_once_on_an_empty_database_all_open_the_study(postgres, tmp_path):
    """Three workers at once on each of 10 fresh databases, with the URL the documentation gives: Optuna's tables
    are created once (the others try again), and no worker is lost (before: 2 of 3 databases lost one)."""
    import multiprocessing

    import optuna.storages  # noqa: F401 (imported once, before the forks)

    context = multiprocessing.get_context("fork")
    outcomes = []
    for attempt in range(10):
        url, results = postgres.fresh_database(f"fresh{attempt}"), context.Queue()
        workers = [context.Process(target=open_in_a_process, args=(url, str(tmp_path / "study"), results))
                   for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        outcomes.append([results.get(timeout=10) for _ in workers])
        assert all(worker.exitcode == 0 for worker in workers) and outcomes[-1] == [0, 0, 0], outcomes[-1]
    said(f"PostgreSQL: 10 fresh databases x 3 workers at once, every worker opened the study: {outcomes}")


def test_a_storage_whose_driver_is_missing_is_one_sentence_naming_it(tmp_path):
    from helpers import cli_env

    done = subprocess.run([sys.executable, "-c", WORKER, "postgresql+psycopg2://u@127.0.0.1:9/db", str(tmp_path)],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 1 and "needs the database driver 'psycopg2', which is not installed" in done.stderr
    assert "smptrain[postgres]" in done.stderr and "psycopg2-binary" in done.stderr


def test_a_training_requeued_by_its_warning_and_by_a_preemption_ends_as_an_uninterrupted_run(slurm, demo_dir,
                                                                                              tmp_path):
    """The documented training script: the time limit's warning (SIGTERM to the srun step) stops the run with
    checkpoints/last written and the script requeues the job; a pre-emption (`scontrol requeue` mid-run) stops it
    again; the job, started again by SLURM each time, ends with the weights and validations of an uninterrupted run,
    and its log is a plain file."""
    config = tiny_config(tmp_path, demo_dir, train={"max_epochs": 24, "threads": 1},
                         log={"preview_every_n_val": 0, "log_every_n_steps": 2})
    straight, run_dir = tmp_path / "artifacts" / "straight", tmp_path / "artifacts" / "rts-unet-v1"
    with ThreadPoolExecutor(1) as beside:  # the uninterrupted run, on the second core while the job runs
        uninterrupted = beside.submit(run, ["python", "-m", "smptrain.train", "--config", str(config), "--set",
                                            "log.run_name=straight"])
        job, out = submit(slurm, tmp_path, "train", recipe("rts-unet", config))  # --time=24:00:00 --signal=TERM@120
        slurm.wait(lambda: logged_steps(run_dir) >= 2, "the job training", 120)
        # Once it trains, a limit of 2 minutes makes the documented warning (TERM@120) due at once: slurmctld sends
        # it at its next time-limit check, within 30 s, while the run (about 40 s of training) still trains.
        slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=2", check=True)
        slurm.wait(lambda: int(slurm.job(job).get("Restarts", 0)) >= 1, "the warning's stop and the script's requeue",
                   200)
        slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=20", check=True)  # before it starts: no 2nd warning
        first = out.read_text()
        assert "SIGTERM" in first and "stopping after this step" in first and "Traceback" not in first, first[-3000:]
        warned_at = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["step"]
        said(f"job {job}: the time limit's warning stopped training at step {warned_at} of "
             f"{24 * 8}; requeued by the script")
        slurm.wait(lambda: slurm.job(job).get("JobState") == "RUNNING" and logged_steps(run_dir) >= warned_at + 6,
                   "the requeued job training again", 200)
        slurm.run("scontrol", "requeue", str(job), check=True)  # how a pre-emption looks
        slurm.wait(lambda: int(slurm.job(job).get("Restarts", 0)) >= 2 and slurm.job(job).get("JobState") != "COMPLETING",
                   "the pre-emption's requeue, once the stopped run has saved", 60)
        preempted_at = json.loads((run_dir / "checkpoints" / "last" / "meta.json").read_text())["step"]
        slurm.wait(lambda: slurm.job(job).get("JobState") in ("COMPLETED", "FAILED"), "the job's end", 300)
        fields = slurm.job(job)
        log = out.read_text()
        resumed = re.findall(r"resuming rts-unet-v1 at step \d+", log)
        said(f"job {job}: {fields['JobState']}, exit {fields['ExitCode']}, restarts {fields['Restarts']}; pre-empted at "
             f"step {preempted_at}; {resumed}")
        done = uninterrupted.result()
    assert done.returncode == 0, done.stderr[-3000:]
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-3000:]
    assert fields["Restarts"] == "2" and resumed == [f"resuming rts-unet-v1 at step {step}" for step in (warned_at,
                                                                                                      preempted_at)]
    assert_same_weights(straight, run_dir)
    assert val_records(straight) == val_records(run_dir)
    assert "\r" not in log  # a file a scheduler keeps: whole lines (what a pre-empted run writes after srun has gone,
    # its stop message, does not reach the log: SLURM's doing; metrics.jsonl holds every validation)
    validations = [line for line in log.splitlines() if "| val/loss" in line]
    assert len(validations) >= 20 and all(re.match(r"epoch \d+/24 step \d+ \| val/loss", v) for v in validations)
    assert re.search(r"^epoch \d+/24: step \d+/8 \(\d+%\) \| loss [\d.]+ \| img/s [\d.]+ \| data wait \d+%", log, re.M)
