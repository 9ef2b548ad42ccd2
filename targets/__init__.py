"""Lowerings of traced graphs to deployment formats (StableHLO, ONNX, TensorRT), installed as `tandemc.targets`."""
