"""Running networks: the onnxruntime engine (onnx_engine.py), prebuilt TensorRT engines (tensorrt.py), the sliding
window (sliding_window.py), a recipe model's folds loaded once and run (runner.py), the Monte-Carlo dropout twins
(stochastic.py), and the agreement rule of parity proofs (agreement.py)."""
