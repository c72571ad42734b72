#!/usr/bin/env bash
# Sets up slimgrade on a fresh machine: system packages (when run as root), a virtual
# environment in .venv, slimgrade itself and what its tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

system_packages() {
  local missing=()
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)      # the sandbox of notebook runs
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)     # the report's browser test
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (Debian/Ubuntu: sudo apt-get install ${missing[*]});" \
         "without bubblewrap notebooks run without isolation." >&2
  fi
}

system_packages
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.14.1 and torchvision==0.29.1 are pinned in pyproject.toml: no other torch is pulled in.
.venv/bin/python -m pip install -q -e '.[test,cluster]'  # cluster: Dask, for batch --scheduler/--cluster and its tests
echo "setup: done. Run the tests with: .venv/bin/python -m pytest -n 2"
