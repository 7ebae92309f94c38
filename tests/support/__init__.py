"""Shared test support: throwaway database servers (servers.py), polling (wait.py), and
in-process Prism servers / sidecar subprocesses (harness.py)."""
