#!/usr/bin/env bash
# Builds the Python package from source in a fresh virtual environment and tests it:
# pytest on crates/python/tests and mypy's stubtest on the installed stubs.
#
# Usage (from the repository root): bash crates/python/ci.sh [VENV_DIR]
# VENV_DIR defaults to target/python-venv; it is deleted and recreated.
# Needs python3 (>= 3.9, with venv) and a Rust toolchain; CARGO_TARGET_DIR is honoured.
set -euo pipefail

venv="${1:-target/python-venv}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

rm -rf "$venv"
python3 -m venv "$venv"
py="$(cd "$venv" && pwd)/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "maturin>=1.9,<2" "numpy>=1.24" "pytest>=7" "mypy>=1.10"
"$py" -m pip install --quiet ./crates/python

# The wheel must ship the stub and the py.typed marker.
"$py" - <<'PY'
import importlib.util, pathlib
package = pathlib.Path(importlib.util.find_spec("attention").origin).parent
for name in ("__init__.pyi", "py.typed"):
    assert (package / name).is_file(), f"the installed package lacks {name}"
PY

"$py" -m pytest -q crates/python/tests
# From another directory, so that stubtest reads the installed package's stub rather
# than crates/python/attention.pyi next to the working directory.
(cd "$venv" && "$py" -m mypy.stubtest attention \
    --allowlist "$root/crates/python/stubtest-allowlist.txt")
