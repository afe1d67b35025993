"""jitmesh-web: the web page for requesters and approvers. A client of the coordinator's public
gRPC API through the SDK (like jitctl), acting only with the signed-in person's own short-lived
token; it holds no credential of its own and never opens the store."""
