#!/usr/bin/env bash
# Makes a Python venv at VENV holding exactly the pinned packages PIN..., once (a stamp file
# records the pins; a change of pins reinstalls). Prints VENV.
#   scripts/pinned-venv.sh VENV PIN...
set -euo pipefail
venv="$1"
shift
stamp="$venv/.thor-pins"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$*" ]; then
  echo "$venv"
  exit 0
fi
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
echo "$*" > "$stamp"
echo "$venv"
