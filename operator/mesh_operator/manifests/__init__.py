"""Pure builders of the Kubernetes objects mesh owns for a MeshModel.

`build_*` functions take plain data (the model's spec, its pool, its plan and the
worker addresses) and return the JSON-ready object to apply. No I/O here; the
handlers apply what these return with server-side apply.
"""
