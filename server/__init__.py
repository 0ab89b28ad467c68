"""lcmserve server: the engine, the runtimes and the gRPC edge."""
