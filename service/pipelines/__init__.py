"""Task pipelines: decode -> preprocess -> infer -> postprocess, as pure functions.

Each task module defines a `Task` (common.py): request options, then preprocess and
postprocess over numpy arrays for one image. The data plane (dataplane.py) runs any
task the same way.
"""
