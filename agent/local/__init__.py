"""The agent's local edge: a unix socket in the state directory (`agent.sock`) that `check`,
`exec` and `breakglass` use. Like `rpc/` for the coordinator's wire: it identifies the caller
(SO_PEERCRED), translates, calls the engine, answers. The client half (`client`, `runner`) is
imported by the `jitmesh-agent` subcommands and stays light (no asyncio, no grpc)."""
