"""Pulumi builders for mlseg's DigitalOcean infrastructure (self-contained: never imports mlseg)."""
