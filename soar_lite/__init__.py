"""soar-lite: SOAR LoRA fine-tuning for rectified-flow image models on one consumer GPU."""

import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# Third-party import-time chatter (transformers' "requires torchvision" notes, torchao's optional
# CUDA kernels, pytree deprecations) buries the one line a user needs. Quiet by default; a user's
# own TRANSFORMERS_VERBOSITY still wins.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
for _name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message=r".*is an Enum subclass.*")
_warnings.filterwarnings("ignore", message=r".*torch_dtype.*is deprecated.*")
