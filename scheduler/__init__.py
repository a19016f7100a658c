"""Decisions, pure Python, no tensors: requests, batching, chunked prefill, KV block placement."""
