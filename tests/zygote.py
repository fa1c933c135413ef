"""The zygote: one Python per pytest worker that has imported torch, smp, Accelerate and smptrain's commands once, and
forks every smptrain command it is given (`helpers.run`), so each is a real process with its exit status, output
and signals without paying 4-5 s of imports again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ZYGOTE = r"""
import io, json, os, runpy, signal, sys, traceback
os.environ["MPLBACKEND"] = "Agg"
sys.modules["wandb"] = None  # timm imports wandb if it can, and wandb makes a temporary folder that its first child
import numpy, pandas, pyarrow, zarr, torch, segmentation_models_pytorch, timm, accelerate, safetensors, click, tqdm
import sklearn.model_selection, scipy.ndimage, matplotlib.pyplot, tensorstore  # imported, never used: forks stay safe
figure = matplotlib.pyplot.figure()  # the first figure of a process loads the fonts: once here, not in every child
figure.gca().plot([0, 1]); figure.gca().set_title("x"); figure.savefig(io.BytesIO(), format="png")
matplotlib.pyplot.close(figure)
import pkgutil, importlib, smptrain.commands, smptrain.train  # every command, and the modules each one calls
for module in pkgutil.iter_modules(smptrain.commands.__path__):
    importlib.import_module("smptrain.commands." + module.name)
import smptrain.evaluation.assess, smptrain.export.convert, smptrain.search.cv, smptrain.search.tune
import mlflow, torch.utils.tensorboard  # the trackers most runs of the tests log to, imported once too
del sys.modules["wandb"]  # ... to exit would remove for all: each child imports wandb itself when it logs to it
requests = sys.stdin
reply = os.fdopen(os.dup(1), "w", buffering=1)
reply.write("ready\n")
for line in requests:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, job["out"]), (2, job["err"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r"))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.argv = job["argv"]
            kind, name = job["target"]
            if kind == "module":
                sys.modules.pop(name, None)  # as `python -m`: the module runs once, as __main__
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            elif kind == "path":
                sys.path[0] = os.path.dirname(os.path.abspath(name))
                runpy.run_path(name, run_name="__main__")
            else:
                module, function = name.split(":")
                __import__(module)
                getattr(sys.modules[module], function)()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    reply.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
"""


class Zygote:
    """A pre-imported Python per pytest worker that forks every smptrain command it is given (see `run`)."""

    _instance = None

    def __init__(self, env: dict, cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=cwd, text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the test zygote did not start")

    @classmethod
    def get(cls, env: dict, cwd: Path) -> "Zygote":
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls(env, cwd)
        return cls._instance

    @staticmethod
    def target(args: list[str], root: Path):
        """What the forked child runs for `args`: a console script's function, a module, or a script; else None."""
        if args[0].startswith("smptrain-"):
            import tomllib

            scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
            return ("entry", scripts[args[0]]) if args[0] in scripts else None
        if args[0] == "python" and len(args) > 2 and args[1] == "-m" and args[2].startswith("smptrain"):
            return ("module", args[2])
        if args[0] == "python" and len(args) > 1 and args[1].endswith(".py"):
            return ("path", args[1])
        return None

    def run(self, full: list[str], target, cwd: Path, env: dict, timeout: float):
        import signal
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            argv = full[1:] if target[0] != "entry" else [full[0], *full[1:]]
            if target[0] == "module":
                argv = [target[1], *full[3:]]
            job = {"argv": argv, "target": target, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            import selectors

            selector = selectors.DefaultSelector()
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                os.killpg(pid, signal.SIGKILL)
                self.proc.stdout.readline()
                raise subprocess.TimeoutExpired(full, timeout)
            code = json.loads(self.proc.stdout.readline())["status"]
            return subprocess.CompletedProcess(full, code, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

