"""Using a trained model: load it (checkpoint or ONNX), predict, export, checkpoints on disk."""
