"""The plugin runtime: the contract every backend implements and the machinery around it."""
