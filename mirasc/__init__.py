"""mirasc: compile Miras memory-layer specs (memory, bias, retention, learner) into PyTorch ops."""

__version__ = "0.1.0"

from mirasc.runtime import MirasOp, compile  # noqa: E402
from mirasc.spec import Spec, SpecError, load_spec  # noqa: E402

__all__ = ["MirasOp", "Spec", "SpecError", "compile", "load_spec", "__version__"]
