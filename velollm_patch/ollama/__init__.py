"""Ollama integration: Modelfiles Ollama accepts, server settings, and our llama-server under it.

- :mod:`.parser` parses and lints Modelfiles exactly as ``ollama create`` reads them.
- :mod:`.modelfile` writes them from a base model's ``/api/show``, the tuner's plan and a request.
- :mod:`.api` is a typed client for the HTTP API (version, ps, show, generate metrics).
- :mod:`.config` recommends and writes ``OLLAMA_*``/``LLAMA_ARG_*`` server settings.
- :mod:`.server_swap` installs our patched llama-server in place of Ollama's and restores it; :mod:`.pins`
  knows which llama.cpp each Ollama release runs, :mod:`.compat` which models only Ollama's compat layer loads.
- :mod:`.launch` starts llama-server exactly as Ollama does (tests and benchmarks).
- :mod:`.store` finds models in the local Ollama store.
- :mod:`.versions` knows which release supports what.
"""
