# Sourced by the scripts: make .venv (once) and install fluxserve with the given extras.
# torch is pinned to the CPU build this project is tested with; an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ensure_env() {
    local extras="$1"
    local stamp=".venv/.installed-${extras//,/-}"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[${extras}]"
        touch "$stamp"
    fi
}
