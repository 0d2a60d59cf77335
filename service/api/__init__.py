"""The HTTP API and the pages (FastAPI); ``provisioner api`` serves them (``service.cli_api``)."""
