"""The satellite node (ARCHITECTURE §2): assignment, validation, durable versioned store, gRPC Federation server.

Never imports torch or transformers: it runs on a small ARM board and sees tensors as numpy arrays.
"""
