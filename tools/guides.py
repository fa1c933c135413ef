"""Run every `sh` code block of the documentation's guides, as written, on the demo data (`bash tools/docs.sh check`).

The pages are taken in the site's order (mkdocs.yml's nav), and each page's `sh` blocks run one after another in
one scratch directory holding a copy of `configs/` (so a later page may use what an earlier one made: the demo data,
the run `first`), with `.venv/bin` first on PATH. A block in `bash` shows what needs your own data, a GPU or a
cluster, and is not run. The first block that fails stops it, naming the page and the block.

    .venv/bin/python tools/guides.py [--keep]       # --keep: leave the scratch directory
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)


def pages() -> list[Path]:
    """The docs pages in nav order."""
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    return [ROOT / "docs" / page for page in nav]


def blocks(page: Path) -> list[str]:
    return [match.group(1) for match in BLOCK.finditer(page.read_text())]


@click.command()
@click.option("--keep", is_flag=True, help="Leave the scratch directory (its path is printed).")
def main(keep: bool) -> None:
    """Run the guides' `sh` blocks in order; exit 1 at the first that fails."""
    scratch = Path(tempfile.mkdtemp(prefix="smptrain-guides-"))
    shutil.copytree(ROOT / "configs", scratch / "configs")
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}
    ran = 0
    started = time.perf_counter()
    try:
        for page in pages():
            for number, block in enumerate(blocks(page), 1):
                name = f"{page.relative_to(ROOT)}, sh block {number}"
                print(f"--- {name}\n{block.rstrip()}", flush=True)
                began = time.perf_counter()
                result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=scratch, env=env,
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    print(result.stdout[-3000:], result.stderr[-5000:], sep="\n", file=sys.stderr)
                    raise click.ClickException(f"{name} failed with exit status {result.returncode}")
                print(f"    ok ({time.perf_counter() - began:.0f} s)", flush=True)
                ran += 1
    finally:
        if keep:
            print(f"scratch directory: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"{ran} blocks of the guides ran as written in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
