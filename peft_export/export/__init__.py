"""Export stages (need torch): graph, merge, onnx, validate, artifact; pipeline.py runs them in order."""
