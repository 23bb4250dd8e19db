"""Every error ebcompile raises on bad input. Each message names the problem and the fix."""

from __future__ import annotations


class EbcompileError(Exception):
    """Base class: catch this to handle any ebcompile input error."""


class InvalidRatioError(EbcompileError, ValueError):
    """A pruning ratio outside the open interval (0, 1)."""


class ConfigError(EbcompileError, ValueError):
    """An argument value ebcompile does not accept (unknown mode, window < 1, ...)."""


class NoPrunableLayerError(EbcompileError):
    """No linear layer left to mask after include/exclude patterns were applied."""


class InputMismatchError(EbcompileError):
    """The example inputs do not run through the model."""


class CaptureError(EbcompileError):
    """No capture path (symbolic_trace, torch.export) could turn the model into a graph."""


class TicketMismatchError(EbcompileError):
    """A ticket (or checkpoint) that was drawn from a different model or configuration."""


class NotPreparedError(EbcompileError):
    """An operation that needs a model returned by ebcompile.prepare got a plain model."""


class NoTicketError(NotPreparedError):
    """An operation that needs a frozen ticket (``compact``) got a model with none applied."""


class CheckpointError(EbcompileError):
    """A checkpoint file that is missing, unreadable or not written by ebcompile."""


class ExportError(EbcompileError):
    """ONNX export or its verification failed; no file is left behind."""


class CompactionError(EbcompileError):
    """The compact model does not compute what the masked one does (a module the rewrites do not cover)."""


class OutputPathError(EbcompileError):
    """A path ebcompile was asked to write cannot be written: a directory or file in the way, a file where a
    parent directory should be, no permission, a full disk. Nothing is left half-written."""


class NonFiniteWeightsError(EbcompileError):
    """Masked weights hold NaN or inf (training diverged): masks drawn from them would mean nothing."""


class DistributedError(EbcompileError):
    """Processes of one training run disagree (different masks, decisions or saved states on different ranks),
    or a sharding layout ebcompile cannot read."""


class ImportanceDataError(EbcompileError):
    """A data-aware importance kind has nothing to score from: no forward pass (``activation``) or no gradient of
    the masked weights (``taylor``) since the last check."""


class TicketStateError(TicketMismatchError):
    """The masks on a model no longer match the ticket applied to it (a ``state_dict`` saved before
    ``apply_ticket`` was loaded after it)."""


class ServingFormatError(EbcompileError, ValueError):
    """A compact model that the serving format (``save_for_serving``: a stock config, or DeciLM / Nemotron-NAS
    ``block_configs``) cannot express; nothing is written."""
