"""``python -m bench.service_noop listen``: the service's own CLI (``python -m service``) with
the no-op providers, so that a retry's resume planning asks them, not the real ones, whether
what the no-op steps made still exists."""

from __future__ import annotations

from bench import noop_providers

noop_providers.install()

from service.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
