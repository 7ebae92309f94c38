"""Backend plugins: one package per backend (plugins/<name>/) plus the shared runtime."""
