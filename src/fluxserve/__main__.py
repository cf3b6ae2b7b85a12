"""`python -m fluxserve` is the `fluxserve` command."""

from __future__ import annotations

from fluxserve.cli import app

app()
