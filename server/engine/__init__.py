"""The engine process: the loop that batches every sample per LCM step, admission, decode, encode."""
