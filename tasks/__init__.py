"""Celery: the app and the thin task adapters over service/."""
