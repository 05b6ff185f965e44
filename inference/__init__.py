"""The model servers of the seed's use case: image classification (OpenCV
DNN, TensorFlow, onnxruntime), object detection and image transformation
(TFLite), in one aiohttp service with dynamic batching, frame-by-frame
streams (`/stream`, `/live`) and the Open Inference Protocol (`/v2`), plus
local (in-process) modes."""
