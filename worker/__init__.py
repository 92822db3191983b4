r"""inference-worker: ONNX models on a Kafka stream.

The flow, one module per stage (see README for the picture)::

    kafka.py -> protocol/ -> batching.py -> cache.py/runtime.py -> protocol/ -> kafka.py
                             \______________ loop.py drives it all ______________/
"""

__version__ = "0.1.0"
