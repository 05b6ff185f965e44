"""ImageNet classification servers for the seed's use case: one aiohttp
service with OpenCV DNN, TensorFlow and onnxruntime backends, dynamic
batching, and a local (in-process) mode."""
