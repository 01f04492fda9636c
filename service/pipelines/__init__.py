"""Task pipelines: decode -> preprocess -> infer -> postprocess, as pure functions.

Each task module exposes `preprocess` and `postprocess` over numpy arrays; the shared
running of a request (decoding in threads, batching, timing) lives in `runner.py`.
"""
