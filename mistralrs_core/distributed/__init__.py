"""Scale-out: device mapping (layers across devices) and tensor parallelism (every layer
across ranks, on ``torch.distributed``). See docs/distributed.md."""
from mistralrs_core.distributed.device_map import DeviceMap, auto_device_map, device_map_from_topology, \
    parse_num_device_layers
from mistralrs_core.distributed.state import DistributedError, TensorParallel, current, init_tensor_parallel, \
    shutdown_tensor_parallel
from mistralrs_core.distributed.step_channel import serve_workers, stop_workers

__all__ = ["DeviceMap", "DistributedError", "TensorParallel", "auto_device_map", "current",
           "device_map_from_topology", "init_tensor_parallel", "parse_num_device_layers", "serve_workers",
           "shutdown_tensor_parallel", "stop_workers"]
