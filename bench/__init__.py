"""`scripts/bench`: jitmesh measured side by side with a raw grpc.aio baseline, on loopback."""
