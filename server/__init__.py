"""HTTP front end: translates requests to runtime calls and back. Never imports torch or onnxruntime."""
