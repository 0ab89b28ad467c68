"""The edge process: gRPC (and later HTTP) transport, validation, the engine pool; never imports torch."""
