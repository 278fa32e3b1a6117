"""Fake ``modules`` package of AUTOMATIC1111 WebUI (tests only)."""
