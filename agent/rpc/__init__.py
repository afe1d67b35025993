"""The agent's link to the coordinator: the only grpc and protobuf code of the agent."""
