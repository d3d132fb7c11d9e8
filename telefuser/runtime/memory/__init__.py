"""Placing models as the plan says: on the device, whole-model offload (MODEL_CPU_OFFLOAD), block streaming
(SEQUENTIAL/ASYNC_CPU_OFFLOAD), the prefetch schedule, peak-memory readings."""
