"""The project's error hierarchy: every user-facing failure is a subclass of :class:`P3BError`.

Each message says what was wrong, where (module / node / group / file) and what to do.
"""

from __future__ import annotations


class P3BError(Exception):
    """Root of every error p3b-fx raises on purpose."""


class TraceError(P3BError):
    """The model cannot be traced by torch.fx (wrong type, dynamic control flow, empty model)."""


class UnsupportedModelError(P3BError):
    """The model traced, but it is not a transformer whose residual sub-blocks we can find."""


class PlanError(P3BError):
    """A keep plan does not match the model's groups (architecture, indices, unprunable groups)."""


class PassError(P3BError):
    """A graph pass failed, or its pre-/post-condition does not hold."""


class ConfigError(P3BError):
    """A user-supplied option or configuration value is invalid."""


class DataError(P3BError):
    """A dataset is missing, corrupt or does not fit the model."""


class CheckpointError(P3BError):
    """A checkpoint is missing, corrupt or belongs to another model."""


class TrainingError(P3BError):
    """Training cannot go on (for example a non-finite loss)."""


class ExportError(P3BError):
    """ONNX export, its checks, or a TensorRT build failed."""


class TargetUnavailableError(ExportError):
    """The requested deployment target cannot run on this machine (no TensorRT, no CUDA)."""
