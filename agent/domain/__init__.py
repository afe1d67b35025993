"""Pure decisions of the agent given the current time.

No grpc, no SQL, no protobuf, no enforcers (import-linter checks it)."""
