"""Generated gRPC stubs for lcmserve.v1 (see protos/, `make proto`)."""
