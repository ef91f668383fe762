#!/usr/bin/env bash
# Install everything the test suite needs (Debian + pip packages) and run it:
# ruff, mypy, then pytest.  .ci/run calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(openssl curl strongswan-pki libstrongswan-extra-plugins postgresql)
missing=()
for pkg in "${debs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet ".[test]"
export PATH="$PWD/.venv/bin:$PATH"

ruff check kvpki_cli tests scripts
mypy
pytest -q "$@"
