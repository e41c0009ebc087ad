"""Helm test support: the helm binary built from the Go module beside this file."""
