#!/usr/bin/env bash
# The documentation site: set up (tools/setup.sh, with the docs extra), then build it with --strict (a broken link, a missing page or a
# failing generated reference is an error) into build/site.
#   bash tools/docs.sh          build
#   bash tools/docs.sh serve    build and serve at http://127.0.0.1:8000 while you edit
#   bash tools/docs.sh check    build, then run every `sh` code block of the guides on the demo data (tools/guides.py)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh  # installs the docs extra too
export NO_MKDOCS_2_WARNING=1  # Material's banner about its successor, printed on every build
case "${1:-build}" in
  serve) exec .venv/bin/mkdocs serve ;;
  check) .venv/bin/mkdocs build --strict --quiet && .venv/bin/python tools/guides.py ;;
  build) .venv/bin/mkdocs build --strict ;;
  *) echo "usage: bash tools/docs.sh [build|serve|check]" >&2; exit 2 ;;
esac
