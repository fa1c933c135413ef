#!/usr/bin/env bash
# What tests/test_cluster.py starts: a single-node SLURM (slurmctld, slurmd, munge) and a PostgreSQL server, from the
# system's packages. Installed only where this may: as root with apt-get; elsewhere it says what is missing and the
# tests that need them are skipped with that sentence. Safe to run again: it only installs what is missing.
set -uo pipefail
need=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || need+=(slurmctld slurmd slurm-client)
command -v munged >/dev/null || need+=(munge)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: ${need[*]} not installed (needs root and apt-get); the SLURM and PostgreSQL tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/tmp/smptrain-apt.log 2>&1; then
  apt-get update -qq >/dev/null 2>&1
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/tmp/smptrain-apt.log 2>&1 \
    || echo "note: apt-get could not install ${need[*]} (see /tmp/smptrain-apt.log); those tests will be skipped" >&2
fi
exit 0
