"""Pure functions on arrays and tensors: boxes, masks/RLE, NMS, prompt sampling, refinement.

Nothing here loads a model, imports ray or touches the file system.
"""
