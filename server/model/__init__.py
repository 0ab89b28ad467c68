"""The model behind the engine: runtimes (eager, compile, aoti, onnx) and the loader that picks one."""
