"""prism-server: validated namespace config → slots bound to plugins (in-process via
plugins.runtime.loader, or sidecars via grpc_adapter.ContractProxy) → pattern executors
(server/patterns/) → one routed gRPC handler per served service, plus health and reflection.

Embedding and tests: `server.app.create_server(ServerOptions(...))` → PrismServer (bound, port 0
allowed; `.port`, `.address`, `start()`, `stop()`). Command line: server/main.py.
"""
