"""Prefect flows: thin wrappers over mlseg."""
