# Sourced by the scripts: make .venv (once) and install fluxserve with the given extras.
# torch is pinned to the CPU build this project is tested with; an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() {
    echo "fluxserve setup: $*" >&2
}

ensure_env() {
    local extras="$1"
    local stamp=".venv/.installed-${extras//,/-}"
    if [ ! -x .venv/bin/python ]; then
        say "first run: making a virtualenv in .venv ($(python3 --version))"
        python3 -m venv .venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        local started=$SECONDS
        say "installing fluxserve[${extras}] into .venv: torch 2.13.0, diffusers, transformers,"
        say "FastAPI, SQLAlchemy and what they need. About 2 GB once installed (torch is most"
        say "of it); a few minutes on a fast connection. Later runs skip this step (until"
        say "pyproject.toml changes)."
        .venv/bin/python -m pip install --quiet --upgrade pip
        # Not --quiet: pip's own lines (each package as it comes, with its download's
        # size and progress bar) show that it is working.
        .venv/bin/python -m pip install --progress-bar on "torch==2.13.0" -e ".[${extras}]"
        touch "$stamp"
        say "done in $((SECONDS - started)) s"
    fi
}
