"""torch_npu._inductor: importing it registers inductor's code generator for the npu device
(torch_npu/_inductor/__init__.py: register_backend_for_device('npu', ...), Triton kernels through
triton-ascend). Releases before 2.6.0 do not ship it. The reference's tensors are CPU tensors, which
inductor compiles already, so it registers nothing; on the older releases the import fails as there."""
from .. import __version__
from ..versions import has_inductor

if not has_inductor(__version__):
    raise ModuleNotFoundError(f"No module named 'torch_npu._inductor' (torch_npu {__version__})",
                              name="torch_npu._inductor")
