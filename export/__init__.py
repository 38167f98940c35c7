"""ONNX export, parity, fp16 and TensorRT engines (installed as `mimic_engine.export`)."""
