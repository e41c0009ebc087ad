"""Kubernetes test support: the control-plane fixture and the Go module that builds it."""
